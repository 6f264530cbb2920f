//! The loss chart a run leaves beside its adapter (`loss.png`).
use super::checkpoint::write_file;
use crate::Result;
use std::path::Path;

/// Writes the loss curve (train loss per step in blue, eval loss in red) as a PNG.
pub fn write_loss_png(path: &Path, losses: &[(usize, f32)], evals: &[(usize, f32)]) -> Result<()> {
    const W: usize = 640;
    const H: usize = 360;
    const M: usize = 30; // margin
    let mut px = vec![255u8; W * H * 3];
    let mut put = |x: usize, y: usize, c: [u8; 3]| {
        if x < W && y < H {
            px[(y * W + x) * 3..(y * W + x) * 3 + 3].copy_from_slice(&c);
        }
    };
    // Axes.
    for x in M..W - M {
        put(x, H - M, [0, 0, 0]);
    }
    for y in M..=H - M {
        put(M, y, [0, 0, 0]);
    }
    let all = losses.iter().chain(evals).filter(|p| p.1.is_finite());
    let (mut lo, mut hi, mut smax) = (f32::INFINITY, f32::NEG_INFINITY, 1usize);
    for &(s, l) in all {
        lo = lo.min(l);
        hi = hi.max(l);
        smax = smax.max(s);
    }
    if !lo.is_finite() {
        lo = 0.0;
        hi = 1.0;
    }
    let span = (hi - lo).max(1e-6);
    let to_xy = |s: usize, l: f32| {
        let x = M + (s as f64 / smax as f64 * (W - 2 * M) as f64) as usize;
        let y = M + ((hi - l) / span * (H - 2 * M) as f32) as usize;
        (x as i64, y as i64)
    };
    let mut line = |a: (i64, i64), b: (i64, i64), c: [u8; 3]| {
        // Bresenham.
        let (dx, dy) = ((b.0 - a.0).abs(), -(b.1 - a.1).abs());
        let (sx, sy) = (
            if a.0 < b.0 { 1 } else { -1 },
            if a.1 < b.1 { 1 } else { -1 },
        );
        let (mut x, mut y, mut err) = (a.0, a.1, dx + dy);
        loop {
            put(x as usize, y as usize, c);
            if (x, y) == b {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    };
    let pts = |v: &[(usize, f32)]| -> Vec<(i64, i64)> {
        v.iter()
            .filter(|p| p.1.is_finite())
            .map(|&(s, l)| to_xy(s, l))
            .collect()
    };
    for (v, c) in [(pts(losses), [30, 90, 200]), (pts(evals), [210, 40, 40])] {
        for w in v.windows(2) {
            line(w[0], w[1], c);
        }
        for &(x, y) in &v {
            if c[0] == 210 {
                for (ox, oy) in [(-1, 0), (1, 0), (0, -1), (0, 1), (0, 0)] {
                    line((x + ox, y + oy), (x + ox, y + oy), c);
                }
            }
        }
    }
    // PNG: 8-bit RGB, rows with filter 0, zlib of stored deflate blocks (no compressor needed).
    let mut raw = Vec::with_capacity(H * (W * 3 + 1));
    for row in px.chunks(W * 3) {
        raw.push(0);
        raw.extend_from_slice(row);
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push((i + 1 == blocks.len()) as u8);
        let n = b.len() as u16;
        z.extend_from_slice(&n.to_le_bytes());
        z.extend_from_slice(&(!n).to_le_bytes());
        z.extend_from_slice(b);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(W as u32).to_be_bytes());
    ihdr.extend_from_slice(&(H as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    for (kind, data) in [(b"IHDR", &ihdr), (b"IDAT", &z), (b"IEND", &Vec::new())] {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = png.len();
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        let crc = crc32(&png[start..]);
        png.extend_from_slice(&crc.to_be_bytes());
    }
    write_file(path, &png)
}

/// CRC-32 (IEEE, reflected), as PNG chunks use.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_checksums_match_the_standard_check_values() {
        // CRC-32/ISO-HDLC check value of "123456789".
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.png");
        write_loss_png(&p, &[(1, 3.0), (2, 2.0)], &[(0, 3.5), (2, 2.5)]).unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: 640 x 360, its CRC over type + data.
        assert_eq!(&b[16..24], &[0, 0, 2, 128, 0, 0, 1, 104]);
        assert_eq!(crc32(&b[12..29]).to_be_bytes(), b[29..33]);
    }
}
