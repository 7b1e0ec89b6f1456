//! `.jsonl` input of `fascicle retain` as arbitrary bytes: documents, or `InvalidInput`
//! naming the file (and the line, when a line is at fault); never a panic.
#![no_main]

use std::path::Path;

use fascicle_api::Error;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzzed.jsonl");
    match fascicle_retain::documents_from_jsonl(data, path) {
        Ok(documents) => assert!(!documents.is_empty()),
        Err(Error::InvalidInput(message)) => assert!(message.contains("fuzzed.jsonl"), "{message}"),
        Err(other) => panic!("not InvalidInput: {other:?}"),
    }
});
