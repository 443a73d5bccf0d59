//! CMOS RTC (MC146818) at ports 0x70/0x71: the wall-clock time in BCD, 24-hour mode, and 128
//! bytes of CMOS RAM. Enough for Linux to read the time at boot; no alarms, no periodic interrupt.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

/// Index port (bit 7 is the NMI mask).
pub const INDEX_PORT: u64 = 0x70;

/// The RTC on the PIO bus at 0x70 (length 2).
pub struct Cmos {
    st: Mutex<(u8, [u8; 128])>,
    /// Seconds to add to the host clock (for tests).
    offset_secs: i64,
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new(0)
    }
}

fn bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

/// (year, month, day, hour, minute, second, weekday 1=Sunday) of a Unix time, UTC.
pub fn civil(secs: i64) -> (i64, u32, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400) as u32;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    let wday = ((days + 4).rem_euclid(7) + 1) as u32; // 1970-01-01 was a Thursday
    (y, m, d, rem / 3600, rem / 60 % 60, rem % 60, wday)
}

impl Cmos {
    /// An RTC showing host time + `offset_secs`.
    pub fn new(offset_secs: i64) -> Self {
        let mut ram = [0u8; 128];
        ram[0x0a] = 0x26; // 32.768 kHz base, 1024 Hz rate, UIP clear
        ram[0x0b] = 0x02; // 24-hour, BCD
        ram[0x0d] = 0x80; // valid RAM and time
        Cmos {
            st: Mutex::new((0, ram)),
            offset_secs,
        }
    }

    /// Index register and CMOS RAM, for a snapshot (the time comes from the host clock).
    pub fn save(&self) -> (u8, Vec<u8>) {
        let st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        (st.0, st.1.to_vec())
    }

    /// Put back what [`Cmos::save`] returned.
    pub fn restore(&self, index: u8, ram: &[u8]) {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        st.0 = index & 0x7f;
        let n = ram.len().min(128);
        st.1[..n].copy_from_slice(&ram[..n]);
    }

    fn now(&self) -> i64 {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        t + self.offset_secs
    }

    fn read_reg(&self, idx: u8, ram: &[u8; 128]) -> u8 {
        let (y, mo, d, h, mi, s, wd) = civil(self.now());
        match idx {
            0x00 => bcd(s),
            0x02 => bcd(mi),
            0x04 => bcd(h),
            0x06 => bcd(wd),
            0x07 => bcd(d),
            0x08 => bcd(mo),
            0x09 => bcd((y % 100) as u32),
            0x32 => bcd((y / 100) as u32),
            0x0c => 0,
            i => ram[usize::from(i & 0x7f)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        data.fill(0xff);
        data[0] = if offset == 0 {
            st.0
        } else {
            self.read_reg(st.0, &st.1)
        };
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        if offset == 0 {
            st.0 = data[0] & 0x7f;
        } else {
            let i = usize::from(st.0);
            match i {
                0x0a => st.1[i] = data[0] & 0x7f, // UIP is read-only
                0x0c | 0x0d => {}
                _ => st.1[i] = data[0],
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0, 5));
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0, 3));
        assert_eq!(civil(1_700_000_000), (2023, 11, 14, 22, 13, 20, 3));
    }

    #[test]
    fn registers_in_bcd() {
        let c = Cmos::new(
            1_700_000_000
                - SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs() as i64,
        );
        let rd = |i: u8| {
            c.write(0, &[i]);
            let mut b = [0u8];
            c.read(1, &mut b);
            b[0]
        };
        assert_eq!(rd(0x09), 0x23);
        assert_eq!(rd(0x32), 0x20);
        assert_eq!(rd(0x08), 0x11);
        assert_eq!(rd(0x0b), 0x02);
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        assert_eq!(rd(0x40), 0x5a);
    }
}
