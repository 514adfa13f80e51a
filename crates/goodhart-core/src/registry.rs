//! Method registries: every family (advantage estimators, losses, regularisers, reward
//! transforms, ...) lists its methods by the name a TOML file uses (`kind = "grpo"`),
//! so `cargo xtask list` can print them all and a config error can name the valid ones.

/// One registered method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodInfo {
    /// The name a config uses, spelled as the field spells it (`"grpo"`, `"k3"`).
    pub name: &'static str,
    /// One line: what it computes.
    pub summary: &'static str,
    /// Where it comes from: paper, and which library's convention the defaults follow.
    pub source: &'static str,
}

/// Comma-separated names of a registry, for error messages.
pub fn names(registry: &[MethodInfo]) -> String {
    registry
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Looks `name` up in `registry`, or errors naming the family and the valid names.
pub fn lookup(
    registry: &'static [MethodInfo],
    family: &str,
    name: &str,
) -> crate::Result<&'static MethodInfo> {
    registry
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| crate::GoodhartError::UnknownMethod {
            family: family.into(),
            name: name.into(),
            known: names(registry),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: &[MethodInfo] = &[
        MethodInfo {
            name: "a",
            summary: "",
            source: "",
        },
        MethodInfo {
            name: "b",
            summary: "",
            source: "",
        },
    ];

    #[test]
    fn unknown_names_list_the_known_ones() {
        assert_eq!(lookup(R, "thing", "b").unwrap().name, "b");
        assert_eq!(
            lookup(R, "thing", "c").unwrap_err().to_string(),
            "unknown thing `c`; known: a, b"
        );
    }
}
