//! Generated inputs shared by the fuzz tests (issue #19).

use proptest::prelude::*;
use serde_json::Value;

/// The cases of a fuzz test: `PROPTEST_CASES` when set (the longer run of
/// docs/RELIABILITY.md), else `default` (what CI runs).
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Any text: short, with any characters (NUL, controls, quotes, astral ones), or long.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => ".{0,12}",
        1 => "[a-z]{250,260}",
        1 => Just("nul\u{0}inside".to_string()),
        1 => Just("  ".to_string()),
    ]
}

/// JSON values of a few levels: strings of any text, integers at their limits, floating-point
/// numbers (normal, subnormal, signed zero, and whole numbers past 2^53 that a decimal
/// store could give back as integers), booleans, null, arrays and objects.
pub fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        proptest::num::f64::NORMAL
            .prop_union(proptest::num::f64::SUBNORMAL)
            .or(proptest::num::f64::ZERO)
            .prop_map(Value::from),
        // Whole numbers written as floats between 2^53 and 2^64, where serde_json's
        // exponent form (`1e17`) reads back as an integer from a decimal column.
        (-64i32..=64, 53u32..64).prop_map(|(m, e)| Value::from(m as f64 * 2f64.powi(e as i32))),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(text(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
