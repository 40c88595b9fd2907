//! Frames on the components' socket: the length header, then a JSON message (the agent reads
//! these from any local process in the debfleet group).
fn target(input: &[u8]) {
    if input.len() >= 4 {
        let _ = debfleet_protocol::component::frame_len([input[0], input[1], input[2], input[3]]);
    }
    let _ = debfleet_protocol::component::decode::<debfleet_protocol::component::Up>(input);
}

fn main() {
    debfleet_fuzz::run(target);
}
