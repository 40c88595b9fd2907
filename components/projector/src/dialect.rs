//! What a projector understands on its serial line, per maker: commands encoded as bytes and
//! replies found in what comes back. Optoma's ASCII protocol is the first dialect (9600 8N1,
//! `~IICC n\r`: projector id, command code, value); codes differ between models, so each
//! dialect is a table, and another maker is another implementation of [`Dialect`].

/// A request to the projector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Power(bool),
    Input(&'static str),
    Aspect(&'static str),
    /// Vertical keystone correction.
    Keystone(i32),
    ShiftH(i32),
    ShiftV(i32),
    /// A remote-control key (menu navigation).
    Key(&'static str),
    QueryPower,
    QueryInput,
}

/// What the projector said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The command was taken.
    Pass,
    /// The command was refused.
    Fail,
    /// The answer to a query.
    Value(String),
    /// An unsolicited state report (Optoma: `INFOn`).
    Info(u8),
}

/// One step of reading replies out of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A reply, and the bytes it used.
    Reply(Reply, usize),
    /// Bytes that are no reply (line noise, a half-plugged cable): skip them.
    Garbage(usize),
    /// Not enough bytes yet.
    Incomplete,
}

pub trait Dialect: Send {
    fn name(&self) -> &'static str;
    /// The inputs, aspect ratios and keys it knows, for the actions' parameter tables.
    fn inputs(&self) -> &'static [&'static str];
    fn aspects(&self) -> &'static [&'static str];
    fn keys(&self) -> &'static [&'static str];
    /// The range of keystone and image-shift values.
    fn keystone_range(&self) -> (i32, i32);
    fn shift_range(&self) -> (i32, i32);
    fn encode(&self, cmd: Command) -> Result<Vec<u8>, String>;
    fn parse(&self, buf: &[u8]) -> Parsed;
    /// A query's answer in words (`on`, `hdmi1`).
    fn power_word(&self, value: &str) -> &'static str;
    fn input_word(&self, value: &str) -> Option<&'static str>;
    /// What an unsolicited report says about the power state.
    fn info_word(&self, info: u8) -> Option<&'static str>;
}

/// Optoma's RS232 ASCII protocol (as in its projectors' RS232 command tables; `id` 0 addresses
/// every projector on the line).
pub struct Optoma {
    pub id: u8,
}

// Names, and the codes at the same places.
const OPTOMA_INPUTS: &[&str] = &["hdmi1", "hdmi2", "vga", "video"];
const OPTOMA_INPUT_CODES: &[u32] = &[1, 15, 5, 10];
const OPTOMA_ASPECTS: &[&str] = &["4:3", "16:9", "lbx", "native", "auto"];
const OPTOMA_ASPECT_CODES: &[u32] = &[1, 2, 3, 5, 7];
const OPTOMA_KEYS: &[&str] = &["up", "left", "enter", "right", "down", "menu", "back"];
const OPTOMA_KEY_CODES: &[u32] = &[10, 11, 12, 13, 14, 20, 74];

fn code(names: &[&str], codes: &[u32], word: &str) -> Result<u32, String> {
    names
        .iter()
        .position(|w| *w == word)
        .and_then(|i| codes.get(i).copied())
        .ok_or_else(|| format!("{word:?} is not one of this dialect's ({})", names.join(", ")))
}

impl Dialect for Optoma {
    fn name(&self) -> &'static str {
        "optoma"
    }

    fn inputs(&self) -> &'static [&'static str] {
        OPTOMA_INPUTS
    }

    fn aspects(&self) -> &'static [&'static str] {
        OPTOMA_ASPECTS
    }

    fn keys(&self) -> &'static [&'static str] {
        OPTOMA_KEYS
    }

    fn keystone_range(&self) -> (i32, i32) {
        (-40, 40)
    }

    fn shift_range(&self) -> (i32, i32) {
        (-100, 100)
    }

    fn encode(&self, cmd: Command) -> Result<Vec<u8>, String> {
        let id = self.id;
        let (code, value): (&str, String) = match cmd {
            Command::Power(on) => ("00", u8::from(on).to_string()),
            Command::Input(w) => ("12", code(OPTOMA_INPUTS, OPTOMA_INPUT_CODES, w)?.to_string()),
            Command::Aspect(w) => ("60", code(OPTOMA_ASPECTS, OPTOMA_ASPECT_CODES, w)?.to_string()),
            Command::Keystone(n) => ("66", n.to_string()),
            Command::ShiftH(n) => ("63", n.to_string()),
            Command::ShiftV(n) => ("64", n.to_string()),
            Command::Key(w) => ("140", code(OPTOMA_KEYS, OPTOMA_KEY_CODES, w)?.to_string()),
            Command::QueryPower => ("124", "1".into()),
            Command::QueryInput => ("121", "1".into()),
        };
        Ok(format!("~{id:02}{code} {value}\r").into_bytes())
    }

    fn parse(&self, buf: &[u8]) -> Parsed {
        // Line ends between replies are nothing.
        let lead = buf.iter().take_while(|b| matches!(b, b'\r' | b'\n' | b' ')).count();
        if lead > 0 {
            return Parsed::Garbage(lead);
        }
        let Some(&first) = buf.first() else { return Parsed::Incomplete };
        let line_end = buf.iter().position(|b| *b == b'\r' || *b == b'\n');
        let with_end = |n: usize| if buf.get(n).is_some_and(|b| *b == b'\r' || *b == b'\n') { n + 1 } else { n };
        match first {
            b'P' if buf.len() == 1 || !buf[1].is_ascii_alphanumeric() => Parsed::Reply(Reply::Pass, with_end(1)),
            b'F' if buf.len() == 1 || !buf[1].is_ascii_alphanumeric() => Parsed::Reply(Reply::Fail, with_end(1)),
            b'O' | b'I' => {
                let Some(end) = line_end else {
                    // A reply is a few bytes; a long run without an end is noise.
                    return if buf.len() > 16 { Parsed::Garbage(1) } else { Parsed::Incomplete };
                };
                let text = String::from_utf8_lossy(&buf[..end]);
                let upper = text.to_ascii_uppercase();
                if let Some(v) =
                    upper.strip_prefix("OK").filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric()))
                {
                    return Parsed::Reply(Reply::Value(v.to_owned()), end + 1);
                }
                if let Some(n) = upper.strip_prefix("INFO").and_then(|v| v.parse::<u8>().ok()) {
                    return Parsed::Reply(Reply::Info(n), end + 1);
                }
                Parsed::Garbage(end + 1)
            }
            _ => Parsed::Garbage(line_end.map_or(1, |e| e + 1)),
        }
    }

    fn power_word(&self, value: &str) -> &'static str {
        match value {
            "1" => "on",
            "0" => "off",
            _ => "unknown",
        }
    }

    fn input_word(&self, value: &str) -> Option<&'static str> {
        let n: u32 = value.parse().ok()?;
        OPTOMA_INPUT_CODES.iter().position(|c| *c == n).map(|i| OPTOMA_INPUTS[i])
    }

    fn info_word(&self, info: u8) -> Option<&'static str> {
        // INFO0: standby, INFO1: warming up, INFO2: cooling down.
        match info {
            0 => Some("off"),
            1 => Some("warming"),
            2 => Some("cooling"),
            _ => None,
        }
    }
}

/// A dialect by name (the `dialect` configuration key).
pub fn by_name(name: &str, id: u8) -> Option<Box<dyn Dialect>> {
    match name {
        "optoma" => Some(Box::new(Optoma { id })),
        _ => None,
    }
}

pub const DIALECTS: &[&str] = &["optoma"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optoma_commands() {
        let o = Optoma { id: 0 };
        assert_eq!(o.encode(Command::Power(true)).unwrap(), b"~0000 1\r");
        assert_eq!(o.encode(Command::Power(false)).unwrap(), b"~0000 0\r");
        assert_eq!(o.encode(Command::Input("hdmi2")).unwrap(), b"~0012 15\r");
        assert_eq!(o.encode(Command::Keystone(-12)).unwrap(), b"~0066 -12\r");
        assert_eq!(o.encode(Command::Key("menu")).unwrap(), b"~00140 20\r");
        assert_eq!(o.encode(Command::QueryPower).unwrap(), b"~00124 1\r");
        assert_eq!(Optoma { id: 7 }.encode(Command::Aspect("16:9")).unwrap(), b"~0760 2\r");
        assert!(o.encode(Command::Input("hdmi9")).is_err());
    }

    #[test]
    fn optoma_replies_among_noise() {
        let o = Optoma { id: 0 };
        assert_eq!(o.parse(b"P\r"), Parsed::Reply(Reply::Pass, 2));
        assert_eq!(o.parse(b"F"), Parsed::Reply(Reply::Fail, 1));
        assert_eq!(o.parse(b"Ok1\r"), Parsed::Reply(Reply::Value("1".into()), 4));
        assert_eq!(o.parse(b"OK15\rP"), Parsed::Reply(Reply::Value("15".into()), 5));
        assert_eq!(o.parse(b"INFO1\r"), Parsed::Reply(Reply::Info(1), 6));
        assert_eq!(o.parse(b"Ok"), Parsed::Incomplete);
        assert_eq!(o.parse(b""), Parsed::Incomplete);
        assert_eq!(o.parse(b"\r\nP"), Parsed::Garbage(2));
        assert_eq!(o.parse(b"\x00\xff#!\rP\r"), Parsed::Garbage(5));
        assert_eq!(o.parse(b"OKAY?\r"), Parsed::Garbage(6));
        assert_eq!(o.parse(b"Pizza\r"), Parsed::Garbage(6));
        assert_eq!(o.parse(&[b'O'; 40]), Parsed::Garbage(1));
        assert_eq!(o.power_word("1"), "on");
        assert_eq!(o.input_word("15"), Some("hdmi2"));
    }
}
