//! Broker URLs as both ends configure them: `mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]`.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<BrokerUrl, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err(format!("{url:?} must start with mqtt:// or mqtts://"));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            // An IPv6 literal without a port ("[::1]") has colons only inside the brackets.
            Some((h, p)) if !h.contains('[') || h.ends_with(']') => {
                (h, p.parse::<u16>().map_err(|_| format!("{url:?}: port {p:?} is not a number"))?)
            }
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(format!("{url:?} has no host"));
        }
        Ok(BrokerUrl { host: host.to_owned(), port, tls })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            BrokerUrl::parse("mqtt://127.0.0.1:1883").unwrap(),
            BrokerUrl { host: "127.0.0.1".into(), port: 1883, tls: false }
        );
        assert_eq!(BrokerUrl::parse("mqtts://b.example").unwrap().port, 8883);
        assert_eq!(
            BrokerUrl::parse("mqtt://[::1]:1999").unwrap(),
            BrokerUrl { host: "::1".into(), port: 1999, tls: false }
        );
        assert_eq!(BrokerUrl::parse("mqtt://[::1]").unwrap().port, 1883);
        for bad in ["mqtt://h:port", "mqtt://", "http://h", "h:1883", "mqtt://:1883"] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
