//! The retain inputs fuzzed (issue #19): arbitrary bytes as a `.jsonl` file or as the
//! files of a folder, and `.jsonl` files mixing valid lines with malformed JSON, wrong
//! types, huge strings, deep nesting, duplicate ids, NUL (no store keeps it), invalid
//! UTF-8, a byte order mark
//! and CRLF line ends. Reading either gives documents that retain stores in full, or an
//! `InvalidInput` naming the file — and the line, for a `.jsonl` line at fault. Never a
//! panic.

use std::path::Path;

use fascicle::Error;
use fascicle_retain::{MemoryBank, read_documents};
use proptest::prelude::*;

/// One line of a `.jsonl` file, and whether it is a valid document line (with its id).
#[derive(Debug, Clone)]
enum Line {
    Document { id: String, text: String },
    Blank,
    Junk(Vec<u8>),
}

fn junk() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Arbitrary bytes (invalid UTF-8 among them), without a line end.
        proptest::collection::vec(any::<u8>().prop_filter("one line", |b| *b != b'\n'), 1..40)
            .prop_filter("not blank", |b| std::str::from_utf8(b)
                .map_or(true, |s| !s.trim().is_empty())),
        Just(b"{\"document_id\": 7, \"text\": \"wrong type\"}".to_vec()),
        Just(b"{\"document_id\": \"a\"}".to_vec()),
        Just(b"{\"document_id\": \"  \", \"text\": \"empty id\"}".to_vec()),
        Just(b"[1, 2, 3]".to_vec()),
        Just(b"{\"document_id\": \"x\", \"text\": \"unterminated".to_vec()),
        Just(format!("{}{}", "[".repeat(3000), "]".repeat(3000)).into_bytes()),
        Just(b"{\"document_id\": \"n\", \"text\": \"a\\u0000b\"}".to_vec()),
        Just(b"{\"document_id\": \"t\", \"text\": \"b\", \"tags\": [1]}".to_vec()),
        Just(vec![0xff, 0xfe, b'{', b'}']),
    ]
}

fn line() -> impl Strategy<Value = Line> {
    prop_oneof![
        6 => ("[a-z0-9/]{1,6}", prop_oneof![".{0,30}", "[a-z ]{20000,20100}"])
            .prop_map(|(id, text)| Line::Document { id, text }),
        1 => Just(Line::Blank),
        2 => junk().prop_map(Line::Junk),
    ]
}

fn render(line: &Line) -> Vec<u8> {
    match line {
        Line::Document { id, text } => {
            serde_json::to_vec(&serde_json::json!({ "document_id": id, "text": text })).unwrap()
        }
        Line::Blank => b"   ".to_vec(),
        Line::Junk(bytes) => bytes.clone(),
    }
}

/// Reads `path`; documents are retained in a fresh store (all of them), a refusal must
/// name `path` (and start with `path line N:` when a line is at fault). That a refused
/// input writes nothing through the CLI — not even a database file — is
/// `cli/tests/fuzz_args.rs`'s `refused_retain_inputs_create_no_database`.
fn check(path: &Path, line: Option<usize>) -> Result<usize, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let bank = MemoryBank::open("memory://").await.unwrap();
        match read_documents(path) {
            Ok(documents) => {
                let n = documents.len();
                bank.retain_now(documents)
                    .await
                    .map_err(|e| format!("retain: {e}"))?;
                Ok(n)
            }
            Err(Error::InvalidInput(message)) => {
                let named = path.display().to_string();
                if !message.contains(&named) {
                    return Err(format!("the refusal does not name the file: {message}"));
                }
                if let Some(line) = line
                    && !message.starts_with(&format!("{named} line {line}:"))
                {
                    return Err(format!("the refusal does not name line {line}: {message}"));
                }
                Err(String::new())
            }
            Err(other) => Err(format!("not InvalidInput: {other:?}")),
        }
    })
}

/// The cases: `PROPTEST_CASES` when set (the longer run of docs/RELIABILITY.md), else
/// `default` (what CI runs).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    /// Arbitrary bytes as a `.jsonl` file: documents or a typed refusal naming the file.
    #[test]
    fn any_bytes_as_jsonl_are_documents_or_a_typed_refusal(
        bytes in proptest::collection::vec(any::<u8>(), 0..400)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input.jsonl");
        std::fs::write(&path, &bytes).unwrap();
        match check(&path, None) {
            Ok(_) => {}
            Err(why) => prop_assert!(why.is_empty(), "{}", why),
        }
    }

    /// Arbitrary bytes as the files of a folder: documents (text files) or a refusal
    /// naming the file that is not UTF-8 or holds a NUL character.
    #[test]
    fn any_bytes_as_files_are_documents_or_a_typed_refusal(
        files in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..4)
    ) {
        let dir = tempfile::tempdir().unwrap();
        for (i, bytes) in files.iter().enumerate() {
            std::fs::write(dir.path().join(format!("doc{i}.txt")), bytes).unwrap();
        }
        let all_text = files
            .iter()
            .all(|f| std::str::from_utf8(f).is_ok_and(|t| !t.contains('\0')));
        match check(dir.path(), None) {
            Ok(n) => {
                prop_assert!(all_text);
                prop_assert_eq!(n, files.len());
            }
            Err(why) => {
                prop_assert!(why.is_empty(), "{}", why);
                prop_assert!(!all_text, "valid text files refused");
            }
        }
    }

    /// Generated `.jsonl` files, with a byte order mark and CRLF line ends sometimes:
    /// every valid line is a document; the first line at fault (junk, or an id seen
    /// before) is named; a file of valid lines retains in full.
    #[test]
    fn generated_jsonl_files_are_read_in_full_or_refused_at_their_first_bad_line(
        lines in proptest::collection::vec(line(), 0..12),
        bom in any::<bool>(),
        crlf in any::<bool>(),
    ) {
        let mut bytes = Vec::new();
        if bom {
            bytes.extend_from_slice("\u{feff}".as_bytes());
        }
        for line in &lines {
            bytes.extend_from_slice(&render(line));
            bytes.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
        }
        // The oracle: the first junk line or repeated id, else the documents.
        let mut seen = std::collections::BTreeSet::new();
        let mut first_bad = None;
        let mut documents = 0;
        for (n, line) in lines.iter().enumerate() {
            match line {
                Line::Document { id, text } if !text.contains('\0') && seen.insert(id.clone()) => {
                    documents += 1
                }
                Line::Blank => {}
                _ => {
                    first_bad = Some(n + 1);
                    break;
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("generated.jsonl");
        std::fs::write(&path, &bytes).unwrap();
        match (check(&path, first_bad), first_bad) {
            (Ok(n), None) => prop_assert_eq!(n, documents),
            (Err(why), None) if documents == 0 => prop_assert!(why.is_empty(), "{}", why),
            (Err(why), Some(_)) => prop_assert!(why.is_empty(), "{}", why),
            (outcome, expected) => prop_assert!(
                false,
                "{:?} for a file whose first bad line is {:?}",
                outcome,
                expected
            ),
        }
    }
}
