//! Where frames go: WS281x LEDs on an SPI bus (a Raspberry Pi's, with rppal), or the virtual
//! strip, which keeps what it was shown so tests and people can see it. The only hardware
//! behind a trait: everything before it is the same code on a device and in the lab.

use std::collections::VecDeque;

use crate::effects::Rgb;

pub trait Output {
    /// Shows one frame (brightness applied).
    fn show(&mut self, frame: &[Rgb]) -> Result<(), String>;
    fn name(&self) -> &'static str;
    /// The virtual strip's memory of what it showed (hardware keeps none).
    fn history(&self) -> Option<&History> {
        None
    }
}

/// The frames a strip showed most recently, oldest first.
#[derive(Default)]
pub struct History {
    pub frames: VecDeque<Vec<Rgb>>,
    /// Frames shown since it started.
    pub shown: u64,
}

/// Frames the virtual strip keeps.
pub const KEPT_FRAMES: usize = 64;

#[derive(Default)]
pub struct Virtual {
    history: History,
}

impl Output for Virtual {
    fn show(&mut self, frame: &[Rgb]) -> Result<(), String> {
        let h = &mut self.history;
        // The oldest buffer is reused: at 60 frames a second nothing is allocated.
        let mut buf = if h.frames.len() >= KEPT_FRAMES { h.frames.pop_front().unwrap_or_default() } else { Vec::new() };
        buf.clear();
        buf.extend_from_slice(frame);
        h.frames.push_back(buf);
        h.shown += 1;
        Ok(())
    }

    fn name(&self) -> &'static str {
        "virtual"
    }

    fn history(&self) -> Option<&History> {
        Some(&self.history)
    }
}

/// The colour order a strip's chips expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Grb,
    Rgb,
    Brg,
}

impl Order {
    pub fn parse(s: &str) -> Option<Order> {
        match s {
            "grb" => Some(Order::Grb),
            "rgb" => Some(Order::Rgb),
            "brg" => Some(Order::Brg),
            _ => None,
        }
    }
}

/// The SPI clock for WS281x: 2.4 MHz, three SPI bits for each of the chip's bits (1.25 µs).
pub const SPI_HZ: u32 = 2_400_000;
/// Zero bytes after a frame: 300 µs low latches it (WS2812B wants more than 280).
const RESET_BYTES: usize = 90;

/// A frame as SPI bytes: each colour bit becomes `110` (one) or `100` (zero), most
/// significant first, in the chips' colour order, then the latch.
pub fn ws281x_encode(frame: &[Rgb], order: Order, out: &mut Vec<u8>) {
    out.clear();
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in frame {
        let [r, g, b] = *c;
        let bytes = match order {
            Order::Grb => [g, r, b],
            Order::Rgb => [r, g, b],
            Order::Brg => [b, r, g],
        };
        for byte in bytes {
            for i in (0..8).rev() {
                acc = (acc << 3) | if byte >> i & 1 == 1 { 0b110 } else { 0b100 };
                bits += 3;
                while bits >= 8 {
                    bits -= 8;
                    out.push((acc >> bits) as u8);
                }
            }
        }
    }
    if bits > 0 {
        out.push((acc << (8 - bits)) as u8);
    }
    out.resize(out.len() + RESET_BYTES, 0);
}

/// WS281x on a Raspberry Pi's SPI bus (MOSI: GPIO 10 on bus 0).
pub struct Spi {
    spi: rppal::spi::Spi,
    order: Order,
    buf: Vec<u8>,
}

impl Spi {
    pub fn open(bus: u8, slave: u8, order: Order) -> Result<Spi, String> {
        use rppal::spi::{Bus, Mode, SlaveSelect};
        let bus = match bus {
            0 => Bus::Spi0,
            1 => Bus::Spi1,
            2 => Bus::Spi2,
            3 => Bus::Spi3,
            4 => Bus::Spi4,
            5 => Bus::Spi5,
            6 => Bus::Spi6,
            n => return Err(format!("no SPI bus {n}")),
        };
        let ss = match slave {
            0 => SlaveSelect::Ss0,
            1 => SlaveSelect::Ss1,
            2 => SlaveSelect::Ss2,
            n => return Err(format!("no SPI slave select {n}")),
        };
        let spi = rppal::spi::Spi::new(bus, ss, SPI_HZ, Mode::Mode0).map_err(|e| format!("opening SPI: {e}"))?;
        Ok(Spi { spi, order, buf: Vec::new() })
    }
}

impl Output for Spi {
    fn show(&mut self, frame: &[Rgb]) -> Result<(), String> {
        ws281x_encode(frame, self.order, &mut self.buf);
        self.spi.write(&self.buf).map(|_| ()).map_err(|e| format!("writing to SPI: {e}"))
    }

    fn name(&self) -> &'static str {
        "spi"
    }
}

/// The last frames as a picture: one row a frame, oldest at the top.
pub fn history_png(h: &History) -> Vec<u8> {
    let frames: Vec<&[Rgb]> = h.frames.iter().map(Vec::as_slice).collect();
    debfleet_component::png::frames(&frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws281x_bits() {
        let mut out = Vec::new();
        // GRB: green 0xff first → eight `110`s, then red 0x00 → eight `100`s.
        ws281x_encode(&[[0x00, 0xff, 0x00]], Order::Grb, &mut out);
        assert_eq!(out.len(), 9 + RESET_BYTES);
        assert_eq!(&out[..3], &[0b1101_1011, 0b0110_1101, 0b1011_0110]);
        assert_eq!(&out[3..6], &[0b1001_0010, 0b0100_1001, 0b0010_0100]);
        assert!(out[9..].iter().all(|b| *b == 0));
        ws281x_encode(&[[0x80, 0, 0]], Order::Rgb, &mut out);
        assert_eq!(out[0], 0b1101_0010, "red's top bit first");
    }

    #[test]
    fn the_virtual_strip_keeps_its_last_frames() {
        let mut v = Virtual::default();
        for i in 0..100u8 {
            v.show(&[[i, 0, 0]; 3]).unwrap();
        }
        let h = v.history().unwrap();
        assert_eq!(h.shown, 100);
        assert_eq!(h.frames.len(), KEPT_FRAMES);
        assert_eq!(h.frames[0][0], [100 - KEPT_FRAMES as u8, 0, 0]);
        assert_eq!(h.frames.back().unwrap()[2], [99, 0, 0]);
        let png = history_png(h);
        assert_eq!(&png[1..4], b"PNG");
    }
}
