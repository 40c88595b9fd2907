//! `debfleet-ros-bridge`: the component's process, run by its systemd unit.

fn main() {
    debfleet_component::run(debfleet_ros_bridge::bridge::Bridge::new());
}
