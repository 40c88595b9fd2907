//! Remote sessions' frame bodies (what a session's key opened): any bytes give a frame or an
//! error, and a frame encodes back to what decodes to it again.
fn target(input: &[u8]) {
    if let Ok(frame) = debfleet_protocol::session::Frame::decode(input) {
        assert_eq!(debfleet_protocol::session::Frame::decode(&frame.encode()), Ok(frame));
    }
}

fn main() {
    debfleet_fuzz::run(target);
}
