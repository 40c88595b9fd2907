//! The LED-strip component (`debfleet-led-strip`): effects as pure functions of their
//! parameters and a step (`effects`), the outputs — WS281x over SPI, or the virtual strip that
//! keeps what it showed (`output`) — and the component itself (`strip`).

pub mod effects;
pub mod output;
pub mod strip;
