//! Calling a ROS service once: the master says where it is (`lookupService`), then TCPROS — a
//! connection header naming the service and its md5sum (the server refuses another type), the
//! request, and an ok byte with the response or the server's error. One deadline for all of it,
//! the master's answer included: a service that hangs costs its caller that long, never more.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use ros_message::MessageValue;

use crate::types::SrvType;
use crate::xmlrpc::Deadlined;

const MAX_HEADER: usize = 64 * 1024;
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

pub fn call(
    master_uri: &str,
    caller: &str,
    service: &str,
    srv: &SrvType,
    request: &MessageValue,
    timeout: Duration,
) -> Result<MessageValue, String> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let mut body = Vec::new();
    srv.request.codec.encode(request, &mut body).map_err(|e| format!("encoding the request: {e}"))?;
    let answer = crate::xmlrpc::call(master_uri, "lookupService", &[caller, service], left())
        .map_err(|e| format!("the ROS master: {e}"))?;
    if crate::xmlrpc::status(&answer) != Some(1) {
        return Err(format!("{service}: no such service registered with the ROS master"));
    }
    let uri = crate::xmlrpc::string_value(&answer).unwrap_or_default();
    let addr = uri
        .strip_prefix("rosrpc://")
        .map(|a| a.trim_end_matches('/'))
        .ok_or_else(|| format!("{service}: the master gave {uri:?}, not rosrpc://HOST:PORT"))?;
    // Every read and write gets what is left of the one deadline.
    let mut s = Deadlined::connect(addr, deadline).map_err(|e| format!("{service} at {e}"))?;
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut {
            format!("{service}: no answer within {timeout:?}")
        } else {
            format!("{service}: {e}")
        }
    };
    write_header(
        &mut s,
        &[
            ("callerid", caller),
            ("service", service),
            ("md5sum", &srv.md5sum),
            ("type", &srv.name),
            ("persistent", "0"),
        ],
    )
    .map_err(io)?;
    let header = read_header(&mut s).map_err(io)?;
    if let Some(e) = header.get("error") {
        return Err(format!("{service} refused the call: {e}"));
    }
    s.write_all(&(body.len() as u32).to_le_bytes()).map_err(io)?;
    s.write_all(&body).map_err(io)?;
    let mut ok = [0u8; 1];
    s.read_exact(&mut ok).map_err(io)?;
    let reply = read_block(&mut s, MAX_RESPONSE).map_err(io)?;
    if ok[0] != 1 {
        return Err(format!("{service} failed: {}", String::from_utf8_lossy(&reply)));
    }
    srv.response.codec.decode(std::io::Cursor::new(reply)).map_err(|e| format!("{service}: decoding the response: {e}"))
}

fn write_header(w: &mut impl Write, fields: &[(&str, &str)]) -> std::io::Result<()> {
    let mut block = Vec::new();
    for (k, v) in fields {
        let field = format!("{k}={v}");
        block.extend_from_slice(&(field.len() as u32).to_le_bytes());
        block.extend_from_slice(field.as_bytes());
    }
    w.write_all(&(block.len() as u32).to_le_bytes())?;
    w.write_all(&block)
}

fn read_block(r: &mut impl Read, max: usize) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a block of {len} bytes")));
    }
    let mut buf = vec![0; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn read_header(r: &mut impl Read) -> std::io::Result<HashMap<String, String>> {
    let block = read_block(r, MAX_HEADER)?;
    let mut fields = HashMap::new();
    let mut rest = block.as_slice();
    while rest.len() >= 4 {
        let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let field =
            rest.get(4..4 + n).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "a short header"))?;
        let text = String::from_utf8_lossy(field);
        if let Some((k, v)) = text.split_once('=') {
            fields.insert(k.to_owned(), v.to_owned());
        }
        rest = &rest[4 + n..];
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_short_or_huge_blocks_are_errors() {
        let mut buf = Vec::new();
        write_header(&mut buf, &[("callerid", "/a"), ("md5sum", "*")]).unwrap();
        let h = read_header(&mut buf.as_slice()).unwrap();
        assert_eq!(h["callerid"], "/a");
        assert_eq!(h["md5sum"], "*");
        let mut short = buf.clone();
        short.truncate(buf.len() - 1);
        assert!(read_header(&mut short.as_slice()).is_err());
        let huge = (u32::MAX).to_le_bytes();
        assert!(read_block(&mut huge.as_slice(), MAX_RESPONSE).is_err());
        // A field longer than its block.
        let mut bad = 8u32.to_le_bytes().to_vec();
        bad.extend(100u32.to_le_bytes());
        bad.extend(b"abcd");
        assert!(read_header(&mut bad.as_slice()).is_err());
    }
}
