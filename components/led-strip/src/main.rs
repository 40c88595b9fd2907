//! `debfleet-led-strip`: the component's process, run by its systemd unit.

fn main() {
    debfleet_component::run(debfleet_led_strip::strip::Strip::new());
}
