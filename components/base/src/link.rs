//! The component's end of the agent's socket: connect, say hello, frames out (written from
//! the runtime's thread) and frames in (a reader thread posts them to the runtime's channel).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::time::Duration;

use debfleet_protocol::component::{decode, encode, frame_len, ComponentMeta, Down, FrameError, Up};

/// What reaches the runtime's loop from the socket.
#[derive(Debug)]
pub enum Incoming {
    Frame(Down),
    /// The connection ended (the agent stopped, or sent something unreadable).
    Closed(String),
    /// A component's own thread has something for it (see `Ctx::waker`).
    Wake,
}

pub struct Link {
    stream: UnixStream,
}

impl Link {
    /// Connects and sends the hello; the reader thread posts what the agent says, tagged with
    /// `generation`, so a late frame of an old connection is told apart from the current one's.
    pub fn open(
        path: &Path,
        meta: &ComponentMeta,
        generation: u64,
        to: Sender<(u64, Incoming)>,
    ) -> std::io::Result<Link> {
        let stream = UnixStream::connect(path)?;
        // A wedged agent must not wedge the component: its effect keeps running.
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut link = Link { stream };
        link.send(&Up::Hello { meta: meta.clone() })?;
        let reader = link.stream.try_clone()?;
        std::thread::Builder::new().name("agent-link".into()).spawn(move || read_frames(reader, generation, to))?;
        Ok(link)
    }

    pub fn send(&mut self, up: &Up) -> std::io::Result<()> {
        let frame = encode(up).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        self.stream.write_all(&frame)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

fn read_frames(mut stream: UnixStream, generation: u64, to: Sender<(u64, Incoming)>) {
    let why = loop {
        match read_frame(&mut stream) {
            Ok(down) => {
                if to.send((generation, Incoming::Frame(down))).is_err() {
                    return;
                }
            }
            Err(e) => break e,
        }
    };
    let _ = to.send((generation, Incoming::Closed(why)));
}

fn read_frame(stream: &mut impl Read) -> Result<Down, String> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).map_err(|e| format!("the agent's socket closed: {e}"))?;
    let n = frame_len(header).map_err(|e: FrameError| e.to_string())?;
    let mut body = vec![0u8; n];
    stream.read_exact(&mut body).map_err(|e| format!("the agent's socket closed mid-frame: {e}"))?;
    decode(&body).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use debfleet_protocol::ids::{ActionName, OpId};

    #[test]
    fn frames_are_read_whole_and_bad_ones_end_the_link() {
        let down = Down::Call {
            id: OpId::new("a").unwrap(),
            action: ActionName::new("clear").unwrap(),
            args: Default::default(),
        };
        let mut bytes = encode(&down).unwrap();
        bytes.extend_from_slice(&[0, 0, 0, 2, b'{', b'x']);
        let mut r = &bytes[..];
        assert_eq!(read_frame(&mut r).unwrap(), down);
        assert!(read_frame(&mut r).unwrap_err().starts_with("bad frame"));
        let huge = u32::MAX.to_be_bytes();
        assert!(read_frame(&mut &huge[..]).unwrap_err().contains("limit"));
    }
}
