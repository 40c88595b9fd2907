//! The few XML-RPC calls the bridge makes itself, each bounded by a deadline: rosrust's own
//! client has no timeouts (a master that hangs would hang its caller), and a node it creates
//! cannot be stopped from outside except through the node's own `shutdown` method.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The answer's body is at most this big (a `lookupService` or `getPid` answer is tiny).
const MAX_ANSWER: u64 = 1 << 20;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Calls `method` with string parameters on the XML-RPC server at `uri` (`http://HOST:PORT/`);
/// the whole call, connection included, within `timeout`. Answers the response's body.
pub fn call(uri: &str, method: &str, params: &[&str], timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let rest = uri.strip_prefix("http://").ok_or_else(|| format!("{uri:?} is not an http:// URI"))?;
    let hostport = rest.split('/').next().unwrap_or_default();
    let mut s = Deadlined::connect(hostport, deadline)?;
    let params: String =
        params.iter().map(|p| format!("<param><value><string>{}</string></value></param>", escape(p))).collect();
    let body = format!(
        "<?xml version=\"1.0\"?><methodCall><methodName>{method}</methodName><params>{params}</params></methodCall>"
    );
    let request = format!(
        "POST / HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let failed = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("{hostport}: {method}: no answer within {timeout:?}")
        }
        _ => format!("{hostport}: {method}: {e}"),
    };
    s.write_all(request.as_bytes()).map_err(failed)?;
    let mut answer = Vec::new();
    (&mut s).take(MAX_ANSWER + 1).read_to_end(&mut answer).map_err(failed)?;
    if answer.len() as u64 > MAX_ANSWER {
        return Err(format!("{hostport}: an answer over {MAX_ANSWER} bytes"));
    }
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("{hostport}: {method}: not HTTP"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("{hostport}: {method}: {}", head.lines().next().unwrap_or_default()));
    }
    Ok(body.to_owned())
}

/// A TCP connection whose every read and write gets what is left of one deadline (a socket's
/// own timeouts apply per operation, so a slow peer could otherwise take several times as long).
pub struct Deadlined {
    s: TcpStream,
    deadline: Instant,
}

impl Deadlined {
    /// Connects to `HOST:PORT` within the deadline; the error names the address.
    pub fn connect(hostport: &str, deadline: Instant) -> Result<Deadlined, String> {
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| format!("{hostport}: {e}"))?
            .next()
            .ok_or_else(|| format!("{hostport}: no address"))?;
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let s = TcpStream::connect_timeout(&addr, left).map_err(|e| format!("{hostport}: {e}"))?;
        Ok(Deadlined { s, deadline })
    }

    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline passed"));
        }
        Ok(left)
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.s.set_read_timeout(Some(self.left()?))?;
        self.s.read(buf)
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.s.set_write_timeout(Some(self.left()?))?;
        self.s.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

/// The status code of a ROS API answer (`[code, message, value]`): 1 is success.
pub fn status(body: &str) -> Option<i64> {
    let at = body.find("<value>")?;
    let rest = &body[at..];
    let start = rest.find("<int>").map(|i| i + 5).or_else(|| rest.find("<i4>").map(|i| i + 4))?;
    let end = rest[start..].find('<')? + start;
    rest[start..end].trim().parse().ok()
}

/// The ROS API answer's value when it is a string (`lookupService`'s URI).
pub fn string_value(body: &str) -> Option<String> {
    // [code, statusMessage, value]: the third value of the array.
    let mut rest = body;
    let mut values = Vec::new();
    while let Some(i) = rest.find("<value>") {
        rest = &rest[i + 7..];
        let end = rest.find("</value>")?;
        values.push(&rest[..end]);
    }
    let v = values.get(3).or(values.last())?;
    let v = v.trim();
    let v = v.strip_prefix("<string>").and_then(|s| s.strip_suffix("</string>")).unwrap_or(v);
    Some(v.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_values_of_ros_answers() {
        let py = "<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n<value><array><data>\n<value><int>1</int></value>\n<value><string>rosrpc URI: [rosrpc://127.0.0.1:4321]</string></value>\n<value><string>rosrpc://127.0.0.1:4321</string></value>\n</data></array></value>\n</param>\n</params>\n</methodResponse>\n";
        assert_eq!(status(py), Some(1));
        assert_eq!(string_value(py).as_deref(), Some("rosrpc://127.0.0.1:4321"));
        let bare = "<methodResponse><params><param><value><array><data><value><i4>-1</i4></value><value>no provider</value><value></value></data></array></value></param></params></methodResponse>";
        assert_eq!(status(bare), Some(-1));
        assert_eq!(status("garbage"), None);
        assert!(call("ftp://x/", "getPid", &[], Duration::from_millis(10)).is_err());
        // Nobody listens on port 9 here: refused at once, not after the timeout.
        let t = Instant::now();
        assert!(call("http://127.0.0.1:9/", "getPid", &["/a"], Duration::from_secs(5)).is_err());
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
