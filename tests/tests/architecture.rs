//! The crate graph of DESIGN.md, checked from the manifests: no crate depends upwards,
//! the leaf crates take only burn and goodhart-core, nothing but xtask takes
//! goodhart-train, and burn stays pinned.

use std::{collections::BTreeMap, fs, path::Path};

/// Layer of each workspace package: a package may depend only on lower layers.
const LAYERS: &[(&str, u8)] = &[
    ("goodhart-core", 0),
    ("goodhart-advantage", 1),
    ("goodhart-objective", 1),
    ("goodhart-regularize", 1),
    ("goodhart-metrics", 1),
    ("goodhart-policy", 1),
    ("goodhart-envs", 1),
    ("goodhart-reward", 2),
    ("goodhart-serve", 2),
    ("goodhart-train", 3),
    ("goodhart-tests", 4),
    ("xtask", 4),
];

const LEAVES: &[&str] = &[
    "goodhart-advantage",
    "goodhart-objective",
    "goodhart-regularize",
    "goodhart-metrics",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
}

fn manifest(path: &Path) -> toml::Table {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every workspace package with the goodhart packages it depends on (normal deps).
fn graph() -> BTreeMap<String, Vec<String>> {
    let mut dirs: Vec<_> = fs::read_dir(root().join("crates"))
        .expect("crates/ exists")
        .map(|e| e.expect("readable entry").path())
        .collect();
    dirs.push(root().join("xtask"));
    dirs.push(root().join("tests"));
    dirs.iter()
        .map(|dir| {
            let m = manifest(&dir.join("Cargo.toml"));
            let name = m["package"]["name"]
                .as_str()
                .expect("package.name")
                .to_string();
            let deps = m
                .get("dependencies")
                .and_then(|d| d.as_table())
                .map(|d| {
                    d.keys()
                        .filter(|k| k.starts_with("goodhart-"))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            (name, deps)
        })
        .collect()
}

fn layer(name: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| {
            panic!("package `{name}` has no layer in DESIGN.md's graph; add it to LAYERS")
        })
        .1
}

#[test]
fn no_crate_depends_upwards() {
    let g = graph();
    assert_eq!(g.len(), LAYERS.len(), "packages: {:?}", g.keys());
    for (pkg, deps) in &g {
        for dep in deps {
            assert!(
                layer(dep) < layer(pkg),
                "{pkg} (layer {}) depends on {dep} (layer {})",
                layer(pkg),
                layer(dep)
            );
        }
    }
}

#[test]
fn leaves_take_only_core_and_only_xtask_takes_train() {
    let g = graph();
    for leaf in LEAVES {
        assert_eq!(
            g[*leaf],
            vec!["goodhart-core".to_string()],
            "{leaf} must depend only on goodhart-core"
        );
    }
    for (pkg, deps) in &g {
        if deps.iter().any(|d| d == "goodhart-train") {
            assert_eq!(pkg, "xtask", "{pkg} depends on goodhart-train");
        }
    }
}

#[test]
fn burn_is_pinned_to_0_21_0() {
    let m = manifest(&root().join("Cargo.toml"));
    let burn = &m["workspace"]["dependencies"]["burn"];
    assert_eq!(burn["version"].as_str(), Some("=0.21.0"));
}

/// Features per package (`name vX.Y.Z` -> `[features]`) from `cargo tree`.
fn features(args: &[&str]) -> BTreeMap<String, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .current_dir(root())
        .args(["tree", "--offline", "--prefix", "none", "-f", "{p} [{f}]"])
        .args(args)
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (pkg, feats) = l.trim_end_matches(" (*)").rsplit_once(" [")?;
            let mut words = pkg.split_whitespace();
            Some((
                format!("{} {}", words.next()?, words.next()?),
                feats.to_string(),
            ))
        })
        .collect()
}

/// `cargo xtask` and `cargo test --workspace` must build every shared crate with the
/// same features, or burn is compiled twice (DESIGN.md: one build).
#[test]
fn xtask_and_tests_share_one_feature_set() {
    let xtask = features(&["-p", "xtask", "-e", "normal,build"]);
    let tests = features(&["--workspace", "-e", "normal,build,dev"]);
    let differ: Vec<String> = xtask
        .iter()
        .filter(|(pkg, f)| tests.get(*pkg).is_some_and(|g| g != *f))
        .map(|(pkg, f)| format!("{pkg}: xtask [{f} / tests [{}", tests[pkg]))
        .collect();
    assert!(
        differ.is_empty(),
        "feature sets differ:\n{}",
        differ.join("\n")
    );
}
