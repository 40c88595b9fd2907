//! What the agent asks of `debfleet-fetch` (one JSON argument), shared by both programs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FetchRequest {
    /// The delta, as the signed index lists it.
    pub url: String,
    pub size: u64,
    pub sha256: String,
    pub base_payload: String,
    pub result_payload: String,
    /// The kept copy of the installed version.
    pub base: PathBuf,
    /// Where the download goes (a partial one there is resumed).
    pub part: PathBuf,
    /// Where the rebuilt package goes.
    pub out: PathBuf,
}
