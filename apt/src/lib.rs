//! apt-get and dpkg, driven non-interactively as child processes (no GPL bindings): transactions
//! with machine-readable progress from `APT::Status-Fd`, dry runs, waiting for the dpkg lock,
//! recovery after an interrupted dpkg, typed errors, and dpkg's own view of installed packages.
//!
//! Conffile policy: `--force-confdef --force-confold` — a conffile the administrator never
//! touched takes the package's new version; a locally modified one is kept (the new one lands
//! next to it as `.dpkg-dist`). A fleet must never stop at a prompt.

pub mod dpkg;
mod errors;
mod run;
pub mod simulate;
pub mod status;

pub use errors::{classify, AptError};
pub use run::{fetched, need_to_get, update_bytes, Apt, LocalDeb, Op, Progress, Report, Spec, UpdateBytes};
pub use simulate::Changes;
