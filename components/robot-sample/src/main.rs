//! `debfleet-robot-sample`: the patrol component's process, run by its systemd unit.

fn main() {
    debfleet_component::run(debfleet_robot_sample::patrol::Patrol::new());
}
