//! A PNG writer for pictures of what a component's hardware would show (the virtual LED strip's
//! frames, a console's rendering of them): 8-bit RGB, one IDAT of stored (uncompressed) deflate
//! blocks — what a person needs to look at, without a compression library.

fn crc32(bytes: &[&[u8]]) -> u32 {
    let mut crc = !0u32;
    for part in bytes {
        for &b in *part {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
    }
    !crc
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in bytes.chunks(5552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
}

/// An RGB image, `width` × `height`, rows top to bottom.
pub fn encode(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
    assert_eq!(rgb.len(), width as usize * height as usize * 3, "pixels for the size");
    let mut raw = Vec::with_capacity(rgb.len() + height as usize);
    for row in rgb.chunks(width as usize * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut z = vec![0x78, 0x01];
    let mut blocks = raw.chunks(65_535).peekable();
    if blocks.peek().is_none() {
        z.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(block) = blocks.next() {
        z.push(u8::from(blocks.peek().is_none()));
        let n = block.len() as u16;
        z.extend_from_slice(&n.to_le_bytes());
        z.extend_from_slice(&(!n).to_le_bytes());
        z.extend_from_slice(block);
    }
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// Frames of a strip of lights as a picture: a row a frame (oldest at the top), each light a
/// square `scale` pixels wide, the scale chosen so a short strip is still visible.
pub fn frames<F: AsRef<[[u8; 3]]>>(frames: &[F]) -> Vec<u8> {
    let lights = frames.iter().map(|f| f.as_ref().len()).max().unwrap_or(0).max(1);
    let scale = (480 / lights).clamp(1, 8);
    let (w, rows) = (lights * scale, frames.len().max(1));
    let mut rgb = Vec::with_capacity(w * rows * scale * 3);
    for i in 0..rows {
        let mut line = Vec::with_capacity(w * 3);
        for light in 0..lights {
            let c = frames.get(i).and_then(|f| f.as_ref().get(light)).copied().unwrap_or([0, 0, 0]);
            for _ in 0..scale {
                line.extend_from_slice(&c);
            }
        }
        for _ in 0..scale {
            rgb.extend_from_slice(&line);
        }
    }
    encode(w as u32, (rows * scale) as u32, &rgb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_known_values() {
        assert_eq!(crc32(&[b"IEND"]), 0xAE42_6082);
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }

    #[test]
    fn a_picture_has_the_png_structure() {
        let png = encode(2, 1, &[255, 0, 0, 0, 0, 255]);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND");
        // Large enough for several stored blocks.
        let big = encode(300, 100, &vec![7; 300 * 100 * 3]);
        assert!(big.len() > 90_000);
        // Three lights, two frames: 8 px squares, 24 x 16 pixels.
        let p = frames(&[[[255, 0, 0]; 3], [[0, 0, 255]; 3]]);
        assert_eq!(&p[16..24], &[0, 0, 0, 24, 0, 0, 0, 16]);
    }
}
