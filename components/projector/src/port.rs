//! The serial line to the projector: open (9600 8N1 unless configured otherwise), one command
//! and its acknowledgement at a time with a timeout, unsolicited reports picked up between
//! commands, noise skipped. An I/O error means the adapter is gone (a USB serial adapter
//! unplugged): the caller drops the port and opens it again later.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::dialect::{Dialect, Parsed, Reply};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineError {
    /// The port failed: unplugged, or not a serial port any more.
    Gone(String),
    /// Nothing but noise or silence within the timeout.
    Timeout,
}

pub struct Port {
    inner: Box<dyn serialport::SerialPort>,
    buf: Vec<u8>,
}

/// Bytes kept while looking for a reply; noise beyond is dropped.
const MAX_BUFFER: usize = 4096;

impl Port {
    pub fn open(path: &str, baud: u32) -> Result<Port, String> {
        let inner = serialport::new(path, baud)
            .data_bits(serialport::DataBits::Eight)
            .parity(serialport::Parity::None)
            .stop_bits(serialport::StopBits::One)
            .flow_control(serialport::FlowControl::None)
            .timeout(Duration::from_millis(50))
            .open()
            .map_err(|e| format!("{path}: {e}"))?;
        Ok(Port { inner, buf: Vec::new() })
    }

    /// Reads what is there (waiting at most the port's short timeout).
    fn fill(&mut self) -> Result<(), LineError> {
        let mut chunk = [0u8; 256];
        match self.inner.read(&mut chunk) {
            Ok(0) => Err(LineError::Gone("the line closed".into())),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                if self.buf.len() > MAX_BUFFER {
                    let cut = self.buf.len() - MAX_BUFFER;
                    self.buf.drain(..cut);
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(LineError::Gone(e.to_string())),
        }
    }

    /// The next reply in what was read, skipping noise; `None` when there is none yet.
    fn next_reply(&mut self, dialect: &dyn Dialect) -> Option<Reply> {
        loop {
            match dialect.parse(&self.buf) {
                Parsed::Reply(r, n) => {
                    self.buf.drain(..n.min(self.buf.len()));
                    return Some(r);
                }
                Parsed::Garbage(n) => {
                    self.buf.drain(..n.clamp(1, self.buf.len().max(1)).min(self.buf.len()));
                }
                Parsed::Incomplete => return None,
            }
        }
    }

    /// Unsolicited reports that arrived since the last look (and whether the line still works).
    pub fn poll(&mut self, dialect: &dyn Dialect) -> Result<Vec<u8>, LineError> {
        self.fill()?;
        let mut infos = Vec::new();
        while let Some(r) = self.next_reply(dialect) {
            if let Reply::Info(n) = r {
                infos.push(n);
            }
        }
        Ok(infos)
    }

    /// Sends one command and waits for its acknowledgement (reports arriving meanwhile are
    /// returned beside it).
    pub fn exchange(
        &mut self,
        dialect: &dyn Dialect,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<(Reply, Vec<u8>), LineError> {
        // What came before belongs to no command of ours.
        let mut infos = self.poll(dialect)?;
        self.buf.clear();
        self.inner.write_all(bytes).map_err(|e| LineError::Gone(e.to_string()))?;
        self.inner.flush().map_err(|e| LineError::Gone(e.to_string()))?;
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(r) = self.next_reply(dialect) {
                match r {
                    Reply::Info(n) => infos.push(n),
                    r => return Ok((r, infos)),
                }
            }
            if Instant::now() >= deadline {
                return Err(LineError::Timeout);
            }
            self.fill()?;
        }
    }
}
