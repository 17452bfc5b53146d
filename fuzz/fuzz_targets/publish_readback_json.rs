//! Like `publish_readback`, with the fuzzer's bytes steering a generator of valid but hostile JSON, so
//! every run reaches the read-back checks: nesting up to 1,000 deep (serde_json's `Value` stops at 128),
//! integers and exponents beyond f64, escapes including lone surrogates, duplicate keys, and whitespace
//! (line breaks too) between tokens.
#![no_main]

#[path = "common/readback.rs"]
mod readback;

use libfuzzer_sys::fuzz_target;

/// Reads the fuzzer's bytes one at a time; zeros once they run out.
struct Steer<'a> {
    bytes: &'a [u8],
    /// One deep chain per input keeps runs fast (a chain is up to 1,000 levels).
    chained: bool,
}

impl Steer<'_> {
    fn byte(&mut self) -> u8 {
        let (first, rest) = self.bytes.split_first().unwrap_or((&0, &[]));
        self.bytes = rest;
        *first
    }
}

const WHITESPACE: [&str; 6] = ["", "", " ", "\n", "\r\n", "\t "];
const KEYS: [&str; 5] = ["a", "b", "a", "", "\\ud800"];

fn whitespace(steer: &mut Steer, out: &mut String) {
    out.push_str(WHITESPACE[usize::from(steer.byte()) % WHITESPACE.len()]);
}

fn digits(steer: &mut Steer, out: &mut String, most: u8) {
    let count = 1 + steer.byte() % most;
    for _ in 0..count {
        out.push(char::from(b'0' + steer.byte() % 10));
    }
}

fn string(steer: &mut Steer, out: &mut String) {
    out.push('"');
    for _ in 0..steer.byte() % 12 {
        match steer.byte() % 8 {
            0 => out.push_str("\\ud800"),
            1 => out.push_str("\\udfff"),
            2 => out.push_str("\\\"\\\\\\/\\b\\f\\n\\r\\t"),
            3 => out.push_str("\\u0000"),
            4 => out.push_str(" \u{e9}\u{2028}\u{1f600}"),
            5 => out.push_str("\\ud83d\\ude00"),
            _ => out.push(char::from(b'a' + steer.byte() % 26)),
        }
    }
    out.push('"');
}

fn value(steer: &mut Steer, out: &mut String, depth: u32) {
    whitespace(steer, out);
    match steer.byte() % 10 {
        0 => out.push_str(["null", "true", "false"][usize::from(steer.byte() % 3)]),
        1 | 2 => {
            if steer.byte() % 2 == 0 {
                out.push('-');
            }
            // An integer part has no leading zero.
            let start = out.len();
            digits(steer, out, 40);
            if out.len() > start + 1 && out.as_bytes()[start] == b'0' {
                out.replace_range(start..=start, "1");
            }
            if steer.byte() % 2 == 0 {
                out.push('.');
                digits(steer, out, 40);
            }
            if steer.byte() % 2 == 0 {
                out.push_str(["e", "E", "e+", "e-"][usize::from(steer.byte() % 4)]);
                digits(steer, out, 5);
            }
        }
        3 => string(steer, out),
        4 | 5 if depth < 32 => {
            out.push('[');
            for index in 0..steer.byte() % 5 {
                if index > 0 {
                    out.push(',');
                }
                value(steer, out, depth + 1);
            }
            whitespace(steer, out);
            out.push(']');
        }
        6 | 7 if depth < 32 => {
            out.push('{');
            for index in 0..steer.byte() % 5 {
                if index > 0 {
                    out.push(',');
                }
                whitespace(steer, out);
                out.push('"');
                out.push_str(KEYS[usize::from(steer.byte()) % KEYS.len()]);
                out.push('"');
                whitespace(steer, out);
                out.push(':');
                value(steer, out, depth + 1);
            }
            whitespace(steer, out);
            out.push('}');
        }
        8 if !steer.chained => {
            steer.chained = true;
            // A deep chain (written iteratively): arrays or single-key objects, far past serde_json's
            // recursion limit of 128.
            let levels = usize::from(u16::from_le_bytes([steer.byte(), steer.byte()])) % 1_000;
            let (open, close) = if steer.byte() % 2 == 0 { ("[", "]") } else { ("{\"k\":", "}") };
            let ws = WHITESPACE[usize::from(steer.byte()) % WHITESPACE.len()];
            for _ in 0..levels {
                out.push_str(open);
                out.push_str(ws);
            }
            value(steer, out, depth + 1);
            for _ in 0..levels {
                out.push_str(ws);
                out.push_str(close);
            }
        }
        _ => out.push_str(
            ["1e400", "-1e-400", "123456789012345678901234567890", "1.0000000000000000000001"]
                [usize::from(steer.byte() % 4)],
        ),
    }
    whitespace(steer, out);
}

fuzz_target!(|bytes: &[u8]| {
    let mut steer = Steer { bytes, chained: false };
    let mut data = String::new();
    value(&mut steer, &mut data, 0);
    assert!(serde_json::from_str::<&serde_json::value::RawValue>(&data).is_ok(), "generated JSON: {data:.200}");
    readback::check(data.as_bytes());
});
