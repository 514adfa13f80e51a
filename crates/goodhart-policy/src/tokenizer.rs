//! Tokenizers: one trait, built-in character- and word-level tokenizers for synthetic
//! tasks, and Hugging Face tokenizers (`tokenizer.json` through the `tokenizers` crate;
//! a model directory's special tokens and chat template with [`HfTokenizer::from_dir`]).
//!
//! The built-in tokenizers reserve ids 0, 1, 2 for `<pad>`, `<bos>`, `<eos>` and number
//! their symbols from 3 in the order given. Encoding never adds special tokens (callers
//! decide where BOS / EOS go); decoding skips them. An unknown symbol is an error, not a
//! silent `<unk>`: synthetic tasks know their alphabet.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use goodhart_core::{GoodhartError, Result};

use crate::chat_template::{ChatMessage, ChatTemplate};

/// Ids of the special tokens a policy needs (any may be absent in a loaded tokenizer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpecialTokens {
    /// Padding (emitted after EOS, fills batches).
    pub pad: Option<u32>,
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End of sequence.
    pub eos: Option<u32>,
}

/// Text <-> token ids.
pub trait Tokenizer {
    /// Token ids of `text`, without special tokens.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Text of `ids`, special tokens skipped.
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// Number of ids (the LM's vocabulary size).
    fn vocab_size(&self) -> usize;
    /// Special token ids.
    fn special(&self) -> SpecialTokens;
}

/// The names of the three reserved ids of the built-in tokenizers.
pub const BUILTIN_SPECIALS: [&str; 3] = ["<pad>", "<bos>", "<eos>"];

/// Symbols numbered from 3, after the reserved specials.
#[derive(Debug, Clone)]
struct Vocab {
    symbols: Vec<String>,
    index: HashMap<String, u32>,
}

impl Vocab {
    fn new(symbols: Vec<String>) -> Result<Self> {
        let mut index = HashMap::new();
        for (i, s) in BUILTIN_SPECIALS
            .iter()
            .map(|s| s.to_string())
            .chain(symbols.iter().cloned())
            .enumerate()
        {
            if index.insert(s.clone(), i as u32).is_some() {
                return Err(GoodhartError::invalid(
                    "vocabulary",
                    format!("`{s}` appears twice"),
                ));
            }
        }
        if symbols.is_empty() {
            return Err(GoodhartError::Empty {
                what: "vocabulary".into(),
            });
        }
        Ok(Self { symbols, index })
    }

    fn id(&self, s: &str) -> Result<u32> {
        self.index.get(s).copied().ok_or_else(|| {
            GoodhartError::invalid("text", format!("`{s}` is not in the vocabulary"))
        })
    }

    /// The symbols of `ids`, specials skipped.
    fn symbols(&self, ids: &[u32]) -> Result<Vec<&str>> {
        let n = BUILTIN_SPECIALS.len();
        ids.iter()
            .filter(|&&i| i as usize >= n)
            .map(|&i| {
                self.symbols
                    .get(i as usize - n)
                    .map(String::as_str)
                    .ok_or_else(|| {
                        GoodhartError::invalid(
                            "ids",
                            format!(
                                "{i} is outside the vocabulary 0..{}",
                                n + self.symbols.len()
                            ),
                        )
                    })
            })
            .collect()
    }

    fn size(&self) -> usize {
        BUILTIN_SPECIALS.len() + self.symbols.len()
    }
}

const BUILTIN: SpecialTokens = SpecialTokens {
    pad: Some(0),
    bos: Some(1),
    eos: Some(2),
};

/// One token per character.
#[derive(Debug, Clone)]
pub struct CharTokenizer(Vocab);

impl CharTokenizer {
    /// A tokenizer over the characters of `alphabet` (in order; repeats are an error).
    pub fn new(alphabet: &str) -> Result<Self> {
        Ok(Self(Vocab::new(
            alphabet.chars().map(String::from).collect(),
        )?))
    }
}

impl Tokenizer for CharTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut buf = [0u8; 4];
        text.chars()
            .map(|c| self.0.id(c.encode_utf8(&mut buf)))
            .collect()
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(self.0.symbols(ids)?.concat())
    }
    fn vocab_size(&self) -> usize {
        self.0.size()
    }
    fn special(&self) -> SpecialTokens {
        BUILTIN
    }
}

/// One token per whitespace-separated word; decoding joins words with one space.
#[derive(Debug, Clone)]
pub struct WordTokenizer(Vocab);

impl WordTokenizer {
    /// A tokenizer over `words` (in order; repeats are an error).
    pub fn new<S: AsRef<str>>(words: &[S]) -> Result<Self> {
        Ok(Self(Vocab::new(
            words.iter().map(|w| w.as_ref().to_string()).collect(),
        )?))
    }
}

impl Tokenizer for WordTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.split_whitespace().map(|w| self.0.id(w)).collect()
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(self.0.symbols(ids)?.join(" "))
    }
    fn vocab_size(&self) -> usize {
        self.0.size()
    }
    fn special(&self) -> SpecialTokens {
        BUILTIN
    }
}

/// A Hugging Face tokenizer loaded from a local `tokenizer.json` (no network).
#[derive(Clone)]
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

impl HfTokenizer {
    /// Loads `path`; `pad`, `bos`, `eos` name special tokens to look up (e.g. GPT-2's
    /// `"<|endoftext|>"` serves as all three). A named token missing from the vocabulary
    /// is an error.
    pub fn from_file(
        path: &Path,
        pad: Option<&str>,
        bos: Option<&str>,
        eos: Option<&str>,
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| GoodhartError::invalid(path.display().to_string(), e.to_string()))?;
        let look = |name: &str, tok: Option<&str>| -> Result<Option<u32>> {
            tok.map(|t| {
                inner.token_to_id(t).ok_or_else(|| {
                    GoodhartError::invalid(
                        name,
                        format!("`{t}` is not in the tokenizer's vocabulary"),
                    )
                })
            })
            .transpose()
        };
        let special = SpecialTokens {
            pad: look("pad", pad)?,
            bos: look("bos", bos)?,
            eos: look("eos", eos)?,
        };
        Ok(Self {
            inner,
            special,
            chat_template: None,
        })
    }

    /// Loads a Hugging Face model directory's tokenizer: `tokenizer.json`, the special
    /// tokens of `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, ...; a
    /// string or an `{"content": ...}` object), and the chat template from
    /// `chat_template.jinja` or, failing that, `tokenizer_config.json`'s `chat_template`
    /// (a string, or a list of named templates of which `default` is taken).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let named = |what: &str, e: &dyn std::fmt::Display| {
            GoodhartError::invalid(config_path.display().to_string(), format!("{what}: {e}"))
        };
        let config: serde_json::Map<String, serde_json::Value> = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path).map_err(|e| named("reading", &e))?;
            serde_json::from_str(&text).map_err(|e| named("not a JSON object", &e))?
        } else {
            Default::default()
        };
        let mut tokens = BTreeMap::new();
        for key in [
            "bos_token",
            "eos_token",
            "unk_token",
            "sep_token",
            "pad_token",
            "cls_token",
            "mask_token",
        ] {
            let text = match config.get(key) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Object(o)) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string),
                None | Some(serde_json::Value::Null) => None,
                Some(other) => return Err(named(key, &format!("{other} is not a token"))),
            };
            if let Some(text) = text {
                tokens.insert(key.to_string(), text);
            }
        }
        let get = |key: &str| tokens.get(key).map(String::as_str);
        let mut tokenizer = Self::from_file(
            &dir.join("tokenizer.json"),
            get("pad_token"),
            get("bos_token"),
            get("eos_token"),
        )?;
        let jinja = dir.join("chat_template.jinja");
        let source =
            if jinja.is_file() {
                Some(std::fs::read_to_string(&jinja).map_err(|e| {
                    GoodhartError::invalid(jinja.display().to_string(), e.to_string())
                })?)
            } else {
                match config.get("chat_template") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(serde_json::Value::Array(list)) => list
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .and_then(|t| t.get("template").and_then(|t| t.as_str()))
                        .map(str::to_string),
                    Some(other) => {
                        return Err(named(
                            "chat_template",
                            &format!("{other} is not a template"),
                        ))
                    }
                }
            };
        tokenizer.chat_template = source.map(|s| ChatTemplate::new(&s, tokens)).transpose()?;
        Ok(tokenizer)
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// `messages` rendered with the chat template, and the text's token ids (encoded
    /// without added special tokens: the template writes them, as transformers'
    /// `apply_chat_template` does). Errors when the model has no chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(String, Vec<u32>)> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            GoodhartError::invalid("chat_template", "this tokenizer has no chat template")
        })?;
        let text = template.render(messages, add_generation_prompt, extra)?;
        let ids = self.encode(&text)?;
        Ok((text, ids))
    }

    /// Token ids of `text` with the special tokens the tokenizer's post-processor adds
    /// (transformers' `tokenizer(text)`; e.g. Llama's BOS).
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| GoodhartError::invalid("text", e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| GoodhartError::invalid("text", e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| GoodhartError::invalid("ids", e.to_string()))
    }
    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    fn special(&self) -> SpecialTokens {
        self.special
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_tokenizer_round_trips() {
        let t = CharTokenizer::new("abc ").unwrap();
        // ids: <pad> 0, <bos> 1, <eos> 2, a 3, b 4, c 5, ' ' 6
        assert_eq!(t.encode("cab a").unwrap(), vec![5, 3, 4, 6, 3]);
        assert_eq!(t.decode(&[1, 5, 3, 4, 2, 0]).unwrap(), "cab");
        assert_eq!(t.vocab_size(), 7);
        assert_eq!(
            t.special(),
            SpecialTokens {
                pad: Some(0),
                bos: Some(1),
                eos: Some(2)
            }
        );
        assert!(t.encode("abd").is_err());
        assert!(t.decode(&[7]).is_err());
        assert!(CharTokenizer::new("aa").is_err());
        assert!(CharTokenizer::new("").is_err());
    }

    #[test]
    fn word_tokenizer_round_trips() {
        let t = WordTokenizer::new(&["the", "cat", "sat"]).unwrap();
        assert_eq!(t.encode("the  cat sat\n").unwrap(), vec![3, 4, 5]);
        assert_eq!(t.decode(&[1, 3, 5, 2]).unwrap(), "the sat");
        assert_eq!(t.vocab_size(), 6);
        assert!(t.encode("the dog").is_err());
    }

    #[test]
    fn hf_word_level_tokenizer_json_loads() {
        let dir = crate::checkpoint::tests::temp_dir("tok");
        let path = dir.join("tokenizer.json");
        let special = |id: u32, content: &str| {
            format!(
                r#"{{"id":{id},"content":"{content}","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}}"#
            )
        };
        let json = format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,
            "added_tokens":[{},{}],
            "normalizer":null,"pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,
            "model":{{"type":"WordLevel","vocab":{{"<pad>":0,"<eos>":1,"<unk>":2,"hello":3,"world":4}},"unk_token":"<unk>"}}}}"#,
            special(0, "<pad>"),
            special(1, "<eos>")
        );
        std::fs::write(&path, json).unwrap();
        let t = HfTokenizer::from_file(&path, Some("<pad>"), None, Some("<eos>")).unwrap();
        assert_eq!(
            t.special(),
            SpecialTokens {
                pad: Some(0),
                bos: None,
                eos: Some(1)
            }
        );
        assert_eq!(t.vocab_size(), 5);
        assert_eq!(t.encode("hello world").unwrap(), vec![3, 4]);
        assert_eq!(t.encode("hello mars").unwrap(), vec![3, 2]);
        assert_eq!(t.decode(&[3, 4, 1, 0]).unwrap(), "hello world");
        assert!(HfTokenizer::from_file(&path, None, Some("<bos>"), None).is_err());
        assert!(HfTokenizer::from_file(&dir.join("missing.json"), None, None, None).is_err());
    }
}
