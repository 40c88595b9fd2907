//! A sample behaviour for a mobile robot, driven through the ROS bridge's node: a patrol of
//! waypoints, steering with `geometry_msgs/Twist` on `/cmd_vel` from the pose on `/odom`
//! (`patrol.rs`); and a simulated robot that integrates those velocities into odometry
//! (`sim.rs`), so the whole loop runs without hardware.

pub mod patrol;
pub mod sim;

/// The pose of a robot on the plane.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Pose {
    pub x: f64,
    pub y: f64,
    /// Heading, radians, counter-clockwise from +x.
    pub theta: f64,
}

impl Pose {
    /// From an odometry message's `pose.pose` as JSON.
    pub fn from_odometry(v: &serde_json::Value) -> Option<Pose> {
        let p = &v["pose"]["pose"];
        let (x, y) = (p["position"]["x"].as_f64()?, p["position"]["y"].as_f64()?);
        let q = &p["orientation"];
        let (z, w) = (q["z"].as_f64().unwrap_or(0.0), q["w"].as_f64().unwrap_or(1.0));
        Some(Pose { x, y, theta: 2.0 * z.atan2(w) })
    }
}

/// An angle brought into (-pi, pi].
pub fn wrap(a: f64) -> f64 {
    let mut a = a % std::f64::consts::TAU;
    if a > std::f64::consts::PI {
        a -= std::f64::consts::TAU;
    } else if a <= -std::f64::consts::PI {
        a += std::f64::consts::TAU;
    }
    a
}
