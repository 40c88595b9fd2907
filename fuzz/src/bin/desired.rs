//! Desired-state records as devices take them off the broker.
fn target(input: &[u8]) {
    let _ = debfleet_protocol::desired::DesiredRecord::parse(input);
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = debfleet_protocol::desired::Window::parse(text);
        let _ = debfleet_protocol::desired::Target::parse(text);
    }
}

fn main() {
    debfleet_fuzz::run(target);
}
