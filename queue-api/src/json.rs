//! JSON text as every store writes it, so that what is read back is the value written.

use serde_json::Value;
use serde_json::ser::{CompactFormatter, Formatter};
use std::io;

/// `value` as compact JSON text that reads back as the same [`Value`] from every store:
/// serde_json's own text, except that a float holding a whole number from 10^16 up to
/// 2^64 is written with a fraction (`100000000000000000.0`, not `1e17`). A decimal column
/// such as PostgreSQL's `jsonb` keeps `1e17` as the number 100000000000000000 and gives it
/// back without exponent or fraction, which serde_json reads as an integer: a different
/// `Value` than the float that was stored. With the fraction it stays a float.
///
/// Drivers write payloads, batch metadata, callbacks (through
/// [`BatchPlan::callbacks_json`](crate::BatchPlan::callbacks_json)) and results with this
/// function; every other value is written exactly as `serde_json::to_string` writes it.
///
/// One difference remains: PostgreSQL's `jsonb` gives `-0.0` back as `0`, read as the
/// float `0.0`. The two are equal under `Value`'s `==` (and `f64`'s), so a payload
/// compares equal after the round trip, but the sign of a negative zero is not kept there.
pub fn to_stored_text(value: &Value) -> String {
    let mut out = Vec::with_capacity(128);
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, WholeFloats);
    serde::Serialize::serialize(value, &mut serializer).expect("a Value serializes");
    // serde_json writes UTF-8 only.
    String::from_utf8(out).expect("JSON text is UTF-8")
}

/// serde_json's compact formatter, with whole floats from 10^16 to 2^64 written in full.
struct WholeFloats;

/// Where serde_json starts writing whole floats with an exponent.
const EXPONENT_FROM: f64 = 1e16;
/// 2^64: from here on a whole number is no `u64` or `i64`, so serde_json reads it back
/// as a float whatever its form.
const INTEGERS_BELOW: f64 = 18446744073709551616.0;

impl Formatter for WholeFloats {
    fn write_f64<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f64) -> io::Result<()> {
        if value.fract() == 0.0 && (EXPONENT_FROM..INTEGERS_BELOW).contains(&value.abs()) {
            // A whole float prints exactly, digit for digit.
            write!(writer, "{value:.1}")
        } else {
            CompactFormatter.write_f64(writer, value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn whole_floats_past_the_exponent_keep_a_fraction() {
        assert_eq!(to_stored_text(&json!(1e17)), "100000000000000000.0");
        assert_eq!(to_stored_text(&json!(-1e16)), "-10000000000000000.0");
        assert_eq!(
            to_stored_text(&json!(18446744073709549568.0)),
            "18446744073709549568.0"
        );
        // Everything else is serde_json's own text.
        for value in [
            json!(1e15),
            json!(0.1),
            json!(1.5e300),
            json!(18446744073709551616.0),
            json!(u64::MAX),
            json!(i64::MIN),
            json!({ "a": [1, "b\u{7f}", null, true, -0.0, 5e-324] }),
        ] {
            assert_eq!(
                to_stored_text(&value),
                serde_json::to_string(&value).unwrap()
            );
        }
        for f in [1e16, 1e17, 1.5e19, -1.5e19, 18446744073709549568.0] {
            let back: Value = serde_json::from_str(&to_stored_text(&json!(f))).unwrap();
            assert_eq!(back, json!(f));
        }
    }
}
