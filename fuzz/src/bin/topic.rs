//! Topic names as every client parses them: what parses names itself again.
fn target(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else { return };
    let topics = debfleet_protocol::Topics::default();
    if let Ok(t) = topics.parse(text) {
        assert_eq!(topics.parse(&topics.name(&t)).ok(), Some(t), "round trip");
    }
}

fn main() {
    debfleet_fuzz::run(target);
}
