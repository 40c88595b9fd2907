//! The simulated robot: a unicycle that follows the last velocity command (for at most half a
//! second: a driver that goes quiet stops it, as real base controllers do) and reports its
//! pose as `nav_msgs/Odometry`.

use std::time::Duration;

use serde_json::{json, Value};

use crate::Pose;

/// Commands older than this stop the robot.
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
pub struct Robot {
    pub pose: Pose,
    /// Forward and turning speed in force, and how long ago they came.
    pub v: f64,
    pub w: f64,
    since_command: Duration,
}

impl Robot {
    /// A `geometry_msgs/Twist` as JSON.
    pub fn command(&mut self, twist: &Value) {
        self.v = twist["linear"]["x"].as_f64().unwrap_or(0.0).clamp(-2.0, 2.0);
        self.w = twist["angular"]["z"].as_f64().unwrap_or(0.0).clamp(-4.0, 4.0);
        self.since_command = Duration::ZERO;
    }

    /// Moves on by `dt`.
    pub fn step(&mut self, dt: Duration) {
        self.since_command += dt;
        if self.since_command > COMMAND_TIMEOUT {
            (self.v, self.w) = (0.0, 0.0);
        }
        let t = dt.as_secs_f64();
        let p = &mut self.pose;
        // Exact for a constant (v, w) over the step: an arc, or a line.
        if self.w.abs() < 1e-9 {
            p.x += self.v * t * p.theta.cos();
            p.y += self.v * t * p.theta.sin();
        } else {
            let th = p.theta + self.w * t;
            p.x += self.v / self.w * (th.sin() - p.theta.sin());
            p.y -= self.v / self.w * (th.cos() - p.theta.cos());
            p.theta = crate::wrap(th);
        }
    }

    /// Its odometry message, as JSON, stamped `secs.nsecs`.
    pub fn odometry(&self, secs: u32, nsecs: u32) -> serde_json::Map<String, Value> {
        let half = self.pose.theta / 2.0;
        let Value::Object(m) = json!({
            "header": {"stamp": {"secs": secs, "nsecs": nsecs}, "frame_id": "odom"},
            "child_frame_id": "base_link",
            "pose": {"pose": {
                "position": {"x": self.pose.x, "y": self.pose.y, "z": 0.0},
                "orientation": {"x": 0.0, "y": 0.0, "z": half.sin(), "w": half.cos()},
            }},
            "twist": {"twist": {"linear": {"x": self.v}, "angular": {"z": self.w}}},
        }) else {
            unreachable!()
        };
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_drives_arcs_and_lines_and_stops_when_commands_stop() {
        let mut r = Robot::default();
        r.command(&json!({"linear": {"x": 1.0}}));
        for _ in 0..10 {
            r.step(Duration::from_millis(40));
        }
        assert!((r.pose.x - 0.4).abs() < 1e-9 && r.pose.y.abs() < 1e-9, "{:?}", r.pose);
        // A quarter turn on a circle of radius 1.
        r = Robot::default();
        for _ in 0..100 {
            r.command(&json!({"linear": {"x": 1.0}, "angular": {"z": 1.0}}));
            r.step(Duration::from_secs_f64(std::f64::consts::FRAC_PI_2 / 100.0));
        }
        assert!((r.pose.x - 1.0).abs() < 1e-6 && (r.pose.y - 1.0).abs() < 1e-6, "{:?}", r.pose);
        let back = Pose::from_odometry(&Value::Object(r.odometry(0, 0))).unwrap();
        assert!((back.theta - std::f64::consts::FRAC_PI_2).abs() < 1e-6, "{back:?}");
        // Quiet for longer than the timeout: it stops.
        let before = r.pose;
        r.step(Duration::from_secs(1));
        assert_eq!(r.pose, before);
    }
}
