//! Reading input documents, and cutting them into memory units and terms.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use fascicle::{Error, Result};
use serde::{Deserialize, Serialize};

/// One document to retain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// Its identity: re-retaining the same id replaces the document.
    pub document_id: String,
    /// UTF-8 text; paragraphs (separated by blank lines) become memory units.
    pub text: String,
    /// Free-form tags, stored with the document.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Reads the documents at `path`: a folder of UTF-8 text files (recursively; the
/// document id is the path relative to the folder, with `/` separators; hidden files and
/// folders are skipped), or a `.jsonl` file of `{"document_id", "text", "tags"}` lines.
///
/// Errors are `Error::InvalidInput` naming the file (and line) at fault: a missing path,
/// a file or line that is not UTF-8, a malformed line, a NUL character (no store keeps
/// it), a duplicate document id, no documents. A `.jsonl` file may start with a UTF-8
/// byte order mark and end its lines with CRLF.
pub fn read_documents(path: &Path) -> Result<Vec<Document>> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::InvalidInput(format!("cannot read {}: {e}", path.display())))?;
    let documents = if meta.is_dir() {
        let mut files = Vec::new();
        collect_files(path, &mut files)?;
        files.sort();
        files
            .into_iter()
            .map(|file| {
                let bytes = std::fs::read(&file).map_err(|e| {
                    Error::InvalidInput(format!("cannot read {}: {e}", file.display()))
                })?;
                let text = String::from_utf8(bytes).map_err(|_| {
                    Error::InvalidInput(format!(
                        "{} is not UTF-8 text; only text files can be retained",
                        file.display()
                    ))
                })?;
                if text.contains('\0') {
                    return Err(Error::InvalidInput(format!(
                        "{} holds a NUL character, which no store keeps; only text files \
                         can be retained",
                        file.display()
                    )));
                }
                let relative = file.strip_prefix(path).unwrap_or(&file);
                let document_id = relative
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                Ok(Document {
                    document_id,
                    text,
                    tags: Vec::new(),
                })
            })
            .collect::<Result<Vec<_>>>()?
    } else if path.extension().is_some_and(|e| e == "jsonl") {
        return read_jsonl(path);
    } else {
        return Err(Error::InvalidInput(format!(
            "{} is neither a folder nor a .jsonl file",
            path.display()
        )));
    };
    let mut seen = BTreeSet::new();
    for doc in &documents {
        if !seen.insert(doc.document_id.as_str()) {
            return Err(Error::InvalidInput(format!(
                "document id `{}` appears twice in {}",
                doc.document_id,
                path.display()
            )));
        }
    }
    nonempty(path, documents)
}

fn nonempty(path: &Path, documents: Vec<Document>) -> Result<Vec<Document>> {
    if documents.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{} holds no documents",
            path.display()
        )));
    }
    Ok(documents)
}

/// The documents of a `.jsonl` file.
fn read_jsonl(path: &Path) -> Result<Vec<Document>> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::InvalidInput(format!("cannot read {}: {e}", path.display())))?;
    documents_from_jsonl(&bytes, path)
}

/// The documents of `.jsonl` content read from `path` (named in errors): one
/// `{"document_id", "text", "tags"}` object per non-blank line; a UTF-8 byte order mark at
/// its start and CRLF line ends are accepted. Every refusal is `Error::InvalidInput`
/// naming the file and the line: not UTF-8, malformed, an empty id, a NUL character (no
/// store keeps it), an id seen on an earlier line; and no documents at all.
pub fn documents_from_jsonl(bytes: &[u8], path: &Path) -> Result<Vec<Document>> {
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    let mut documents = Vec::new();
    // Each document id with the line it came from.
    let mut lines_of: std::collections::BTreeMap<String, usize> = Default::default();
    for (n, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let at = || format!("{} line {}", path.display(), n + 1);
        let line = std::str::from_utf8(line)
            .map_err(|e| Error::InvalidInput(format!("{}: not UTF-8 text ({e})", at())))?;
        if line.trim().is_empty() {
            continue;
        }
        let doc: Document = serde_json::from_str(line).map_err(|e| {
            Error::InvalidInput(format!(
                "{}: expected {{\"document_id\", \"text\", \"tags\"}}: {e}",
                at()
            ))
        })?;
        if doc.document_id.trim().is_empty() {
            return Err(Error::InvalidInput(format!(
                "{}: document_id is empty",
                at()
            )));
        }
        let nul = |s: &str| s.contains('\0');
        if nul(&doc.document_id) || nul(&doc.text) || doc.tags.iter().any(|t| nul(t)) {
            return Err(Error::InvalidInput(format!(
                "{}: holds a NUL character (\\u0000), which no store keeps",
                at()
            )));
        }
        if let Some(first) = lines_of.insert(doc.document_id.clone(), n + 1) {
            return Err(Error::InvalidInput(format!(
                "{}: document id `{}` appears twice (first on line {first})",
                at(),
                doc.document_id
            )));
        }
        documents.push(doc);
    }
    nonempty(path, documents)
}

fn collect_files(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::InvalidInput(format!("cannot list {}: {e}", dir.display())))?;
    for entry in entries {
        let entry = entry
            .map_err(|e| Error::InvalidInput(format!("cannot list {}: {e}", dir.display())))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| Error::InvalidInput(format!("cannot stat {}: {e}", path.display())))?;
        if kind.is_dir() {
            collect_files(&path, files)?;
        } else if kind.is_file() {
            files.push(path);
        }
    }
    Ok(())
}

/// The memory units of a text: its paragraphs (separated by blank lines), with runs of
/// whitespace folded to one space. Empty paragraphs are dropped.
pub fn split_units(text: &str) -> Vec<String> {
    let mut units = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                units.push(std::mem::take(&mut current));
            }
            continue;
        }
        for word in line.split_whitespace() {
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(word);
        }
    }
    if !current.is_empty() {
        units.push(current);
    }
    units
}

/// Words that are capitalised only because they start a sentence.
const STOPWORDS: &[&str] = &[
    "About", "After", "Again", "All", "Also", "Although", "And", "Any", "Are", "Because", "Before",
    "Both", "But", "Each", "Even", "Every", "For", "From", "Her", "Here", "His", "How", "However",
    "Its", "Most", "Much", "Not", "Now", "Once", "One", "Only", "Our", "She", "Since", "Some",
    "Still", "That", "The", "Their", "Then", "There", "These", "They", "This", "Those", "Though",
    "Two", "Until", "Was", "Were", "What", "When", "Where", "Which", "While", "Who", "Why", "With",
    "Within", "Yet", "You", "Your",
];

/// The terms a memory unit mentions: capitalised words of three letters or more that
/// are not common sentence openers, sorted and deduplicated. Consolidation builds one
/// observation per term shared by several units.
pub fn terms(text: &str) -> Vec<String> {
    let mut found = BTreeSet::new();
    for raw in text.split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '\'')) {
        let word = raw.trim_matches(|c: char| c == '-' || c == '\'');
        let word = word.strip_suffix("'s").unwrap_or(word);
        let mut chars = word.chars();
        let Some(first) = chars.next() else { continue };
        if !first.is_uppercase() || word.chars().count() < 3 {
            continue;
        }
        if !word.chars().any(|c| c.is_lowercase()) {
            continue;
        }
        if STOPWORDS.binary_search(&word).is_ok() {
            continue;
        }
        found.insert(word.to_string());
    }
    found.into_iter().collect()
}

/// A stable fingerprint of a document's content (text and tags), to skip documents
/// that did not change (64-bit FNV-1a, hex).
pub(crate) fn content_hash(doc: &Document) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(doc.text.as_bytes());
    for tag in &doc.tags {
        feed(&[0]);
        feed(tag.as_bytes());
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopwords_are_sorted_for_binary_search() {
        assert!(STOPWORDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn paragraphs_become_units() {
        let units = split_units("First  line\ncontinues.\n\n\n  Second.\n\nThird\n");
        assert_eq!(units, ["First line continues.", "Second.", "Third"]);
        assert!(split_units(" \n\n ").is_empty());
    }

    #[test]
    fn terms_are_capitalised_words_without_sentence_openers() {
        assert_eq!(
            terms(
                "The Harbor Board met Mira's crew in Saltmere. When it rained, NASA and Al left."
            ),
            ["Board", "Harbor", "Mira", "Saltmere"]
        );
    }

    #[test]
    fn the_hash_changes_with_text_and_tags() {
        let doc = Document {
            document_id: "a".into(),
            text: "x".into(),
            tags: vec![],
        };
        let mut tagged = doc.clone();
        tagged.tags.push("t".into());
        let mut edited = doc.clone();
        edited.text.push('y');
        assert_ne!(content_hash(&doc), content_hash(&tagged));
        assert_ne!(content_hash(&doc), content_hash(&edited));
        assert_eq!(content_hash(&doc), content_hash(&doc.clone()));
    }

    #[test]
    fn folders_and_jsonl_are_read_and_bad_input_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("b.txt"), "B").unwrap();
        std::fs::write(dir.path().join("sub/a.txt"), "A").unwrap();
        std::fs::write(dir.path().join(".hidden"), "H").unwrap();
        let docs = read_documents(dir.path()).unwrap();
        let ids: Vec<_> = docs.iter().map(|d| d.document_id.as_str()).collect();
        assert_eq!(ids, ["b.txt", "sub/a.txt"]);

        let jsonl = dir.path().join("docs.jsonl");
        std::fs::write(
            &jsonl,
            "{\"document_id\":\"x\",\"text\":\"X\",\"tags\":[\"t\"]}\n\n{\"document_id\":\"y\",\"text\":\"Y\"}\n",
        )
        .unwrap();
        let docs = read_documents(&jsonl).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].tags, ["t"]);

        std::fs::write(&jsonl, "{\"document_id\":\"x\",\"text\":\"X\"}\nnot json\n").unwrap();
        let err = read_documents(&jsonl).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        std::fs::write(
            &jsonl,
            "{\"document_id\":\"x\",\"text\":\"X\"}\n{\"document_id\":\"x\",\"text\":\"Y\"}\n",
        )
        .unwrap();
        let err = read_documents(&jsonl).unwrap_err().to_string();
        assert!(err.contains("appears twice"), "{err}");

        std::fs::write(dir.path().join("bin.txt"), [0xff, 0xfe, 0x00]).unwrap();
        let err = read_documents(dir.path()).unwrap_err().to_string();
        assert!(err.contains("bin.txt is not UTF-8"), "{err}");

        let err = read_documents(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = read_documents(empty.path()).unwrap_err().to_string();
        assert!(err.contains("holds no documents"), "{err}");
    }
}
