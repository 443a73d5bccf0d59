//! CMOS RTC (MC146818) at ports 0x70/0x71: the wall-clock time, 128 bytes of CMOS RAM, and
//! a clock the guest can set (`hwclock -w`): what it writes is kept as an offset from the host
//! clock. Registers follow Register B's data mode (BCD or binary) and hour format (12 or 24).
//! No alarm, update or periodic interrupts: the ACPI tables describe the RTC without an IRQ,
//! so Linux's rtc-cmos registers /dev/rtc0 without alarms and `hwclock` polls the seconds.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

/// Index port (bit 7 is the NMI mask).
pub const INDEX_PORT: u64 = 0x70;

/// Seconds, minutes, hours, day of week, day of month, month, year (two digits).
const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
/// Register A: divider and rate; bit 7 is Update In Progress (read-only).
const REG_A: u8 = 0x0a;
/// Register B: SET (bit 7), interrupt enables, DM (bit 2, binary), 24/12 (bit 1).
const REG_B: u8 = 0x0b;
/// Register C: interrupt flags (read-only; none are raised).
const REG_C: u8 = 0x0c;
/// Register D: Valid RAM and Time (bit 7; read-only).
const REG_D: u8 = 0x0d;
/// The century, where the FADT's CENTURY field points.
pub const REG_CENTURY: u8 = 0x32;
const B_SET: u8 = 0x80;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
/// The PM flag of the hours register in 12-hour mode.
const HOUR_PM: u8 = 0x80;
/// The time registers, in the order [`Cmos::fields`] returns them.
const TIME_REGS: [u8; 8] = [
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_WEEKDAY,
    REG_DAY,
    REG_MONTH,
    REG_YEAR,
    REG_CENTURY,
];

/// Index, RAM and the guest's clock offset.
struct State {
    index: u8,
    ram: [u8; 128],
    /// Seconds the guest's clock is ahead of the host's.
    offset: i64,
}

/// The RTC on the PIO bus at 0x70 (length 2).
pub struct Cmos {
    st: Mutex<State>,
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new(0)
    }
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

/// Unix time of a UTC date and time (the inverse of [`civil`], without the weekday).
pub fn unix_time(y: i64, m: u32, d: u32, hh: u32, mm: u32, ss: u32) -> i64 {
    // Howard Hinnant's days-from-civil.
    let y = y - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86400 + i64::from(hh) * 3600 + i64::from(mm) * 60 + i64::from(ss)
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Cmos {
    /// An RTC showing host time + `offset_secs`.
    pub fn new(offset_secs: i64) -> Self {
        let mut ram = [0u8; 128];
        ram[usize::from(REG_A)] = 0x26; // 32.768 kHz base, 1024 Hz rate, UIP clear
        ram[usize::from(REG_B)] = B_24H; // 24-hour, BCD
        ram[usize::from(REG_D)] = 0x80; // valid RAM and time
        Cmos {
            st: Mutex::new(State {
                index: 0,
                ram,
                offset: offset_secs,
            }),
        }
    }

    /// Index register, CMOS RAM and the guest clock's offset from the host's, for a snapshot.
    pub fn save(&self) -> (u8, Vec<u8>, i64) {
        let st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        (st.index, st.ram.to_vec(), st.offset)
    }

    /// Put back what [`Cmos::save`] returned.
    pub fn restore(&self, index: u8, ram: &[u8], offset: i64) {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        st.index = index & 0x7f;
        let n = ram.len().min(128);
        st.ram[..n].copy_from_slice(&ram[..n]);
        st.offset = offset;
    }

    /// The time registers' values (in [`TIME_REGS`] order) for a Unix time, in the data mode
    /// and hour format Register B selects.
    fn fields(secs: i64, b: u8) -> [u8; 8] {
        let (y, mo, d, h, mi, s, wd) = civil(secs);
        let enc = |v: u32| {
            if b & B_BINARY != 0 {
                v as u8
            } else {
                (((v / 10) << 4) | (v % 10)) as u8
            }
        };
        let hour = if b & B_24H != 0 {
            enc(h)
        } else {
            let h12 = if h % 12 == 0 { 12 } else { h % 12 };
            enc(h12) | if h >= 12 { HOUR_PM } else { 0 }
        };
        let y = y.clamp(0, 9999) as u32;
        [
            enc(s),
            enc(mi),
            hour,
            enc(wd),
            enc(d),
            enc(mo),
            enc(y % 100),
            enc(y / 100),
        ]
    }

    /// The Unix time the time registers in `ram` name, or None if they do not name one.
    fn parse(ram: &[u8; 128]) -> Option<i64> {
        let b = ram[usize::from(REG_B)];
        let dec = |r: u8| -> Option<u32> {
            let v = ram[usize::from(r)];
            if b & B_BINARY != 0 {
                Some(u32::from(v))
            } else {
                let (hi, lo) = (u32::from(v >> 4), u32::from(v & 0xf));
                (hi < 10 && lo < 10).then_some(hi * 10 + lo)
            }
        };
        let hour = if b & B_24H != 0 {
            dec(REG_HOURS)?
        } else {
            let raw = ram[usize::from(REG_HOURS)];
            let pm = raw & HOUR_PM != 0;
            let v = if b & B_BINARY != 0 {
                u32::from(raw & !HOUR_PM)
            } else {
                let r = raw & !HOUR_PM;
                u32::from(r >> 4) * 10 + u32::from(r & 0xf)
            };
            if !(1..=12).contains(&v) {
                return None;
            }
            v % 12 + if pm { 12 } else { 0 }
        };
        let (s, mi, d, mo) = (
            dec(REG_SECONDS)?,
            dec(REG_MINUTES)?,
            dec(REG_DAY)?,
            dec(REG_MONTH)?,
        );
        let year = dec(REG_CENTURY)? * 100 + dec(REG_YEAR)?;
        if s > 59 || mi > 59 || hour > 23 || !(1..=31).contains(&d) || !(1..=12).contains(&mo) {
            return None;
        }
        Some(unix_time(i64::from(year), mo, d, hour, mi, s))
    }

    /// Latch the running clock into the time registers of `ram`.
    fn latch(st: &mut State) {
        let f = Self::fields(host_now() + st.offset, st.ram[usize::from(REG_B)]);
        for (r, v) in TIME_REGS.iter().zip(f) {
            st.ram[usize::from(*r)] = v;
        }
    }

    /// Take the time the time registers now name as the clock (a register write done, or SET
    /// cleared); registers that name no time leave the clock as it was.
    fn commit(st: &mut State) {
        if let Some(t) = Self::parse(&st.ram) {
            st.offset = t - host_now();
        }
    }

    fn read_reg(st: &mut State) -> u8 {
        let idx = st.index;
        // While SET is on the clock is frozen at what the guest is writing.
        if TIME_REGS.contains(&idx) && st.ram[usize::from(REG_B)] & B_SET == 0 {
            Self::latch(st);
        }
        match idx {
            REG_C => 0,
            i => st.ram[usize::from(i & 0x7f)],
        }
    }

    fn write_reg(st: &mut State, v: u8) {
        let idx = st.index;
        let set = st.ram[usize::from(REG_B)] & B_SET != 0;
        match idx {
            REG_A => st.ram[usize::from(REG_A)] = v & 0x7f, // UIP is read-only
            REG_C | REG_D => {}
            REG_B => {
                if !set && v & B_SET != 0 {
                    // Entering SET: the registers hold the time as it stands, for the guest
                    // to overwrite some of them.
                    Self::latch(st);
                }
                // A new data mode or hour format applies from the next latch: the clock
                // itself is an offset, so nothing is converted.
                st.ram[usize::from(REG_B)] = v;
                if set && v & B_SET == 0 {
                    Self::commit(st);
                }
            }
            i if TIME_REGS.contains(&i) => {
                if !set {
                    Self::latch(st);
                }
                st.ram[usize::from(i)] = v;
                if !set {
                    Self::commit(st);
                }
            }
            i => st.ram[usize::from(i)] = v,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        data.fill(0xff);
        data[0] = if offset == 0 {
            st.index
        } else {
            Self::read_reg(&mut st)
        };
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        if offset == 0 {
            st.index = data[0] & 0x7f;
        } else {
            Self::write_reg(&mut st, data[0]);
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

    fn rw(c: &Cmos) -> (impl Fn(u8) -> u8 + '_, impl Fn(u8, u8) + '_) {
        let rd = move |i: u8| {
            c.write(0, &[i]);
            let mut b = [0u8];
            c.read(1, &mut b);
            b[0]
        };
        let wr = move |i: u8, v: u8| {
            c.write(0, &[i]);
            c.write(1, &[v]);
        };
        (rd, wr)
    }

    #[test]
    fn unix_time_inverts_civil() {
        for t in [
            0i64,
            951_782_400,
            1_700_000_000,
            4_102_444_799,
            86_399,
            68_169_600,
        ] {
            let (y, mo, d, h, mi, s, _) = civil(t);
            assert_eq!(unix_time(y, mo, d, h, mi, s), t);
        }
    }

    #[test]
    fn guest_sets_the_clock_as_linux_does() {
        // mc146818_set_time: SET on, write every time register, SET off.
        let c = Cmos::new(0);
        let (rd, wr) = rw(&c);
        wr(REG_B, B_24H | B_SET);
        for (r, v) in [
            (REG_SECONDS, 0x56),
            (REG_MINUTES, 0x34),
            (REG_HOURS, 0x12),
            (REG_DAY, 0x29),
            (REG_MONTH, 0x02),
            (REG_YEAR, 0x04),
            (REG_CENTURY, 0x20),
        ] {
            wr(r, v);
        }
        // Frozen while SET is on.
        assert_eq!(rd(REG_SECONDS), 0x56);
        wr(REG_B, B_24H);
        let want = unix_time(2004, 2, 29, 12, 34, 56);
        let (_, _, off) = c.save();
        assert!((off - (want - host_now())).abs() <= 1, "offset {off}");
        assert_eq!(
            (rd(REG_YEAR), rd(REG_MONTH), rd(REG_DAY), rd(REG_HOURS)),
            (0x04, 0x02, 0x29, 0x12)
        );
        // The offset survives a snapshot.
        let (i, ram, off) = c.save();
        let d = Cmos::new(0);
        d.restore(i, &ram, off);
        let (rd2, _) = rw(&d);
        assert_eq!((rd2(REG_YEAR), rd2(REG_CENTURY)), (0x04, 0x20));
    }

    #[test]
    fn binary_and_twelve_hour_modes() {
        // 2023-11-14 22:13:20 UTC.
        let c = Cmos::new(1_700_000_000 - host_now());
        let (rd, wr) = rw(&c);
        wr(REG_B, B_BINARY | B_24H);
        assert_eq!((rd(REG_YEAR), rd(REG_MONTH), rd(REG_HOURS)), (23, 11, 22));
        wr(REG_B, B_BINARY);
        assert_eq!(rd(REG_HOURS), 10 | HOUR_PM);
        wr(REG_B, 0);
        assert_eq!(rd(REG_HOURS), 0x10 | HOUR_PM);
        // Setting 12 AM (midnight) in 12-hour BCD mode, one register at a time.
        wr(REG_HOURS, 0x12);
        wr(REG_B, B_24H);
        assert_eq!(rd(REG_HOURS), 0x00);
        assert_eq!(rd(REG_DAY), 0x14);
    }

    #[test]
    fn nonsense_time_leaves_the_clock_alone() {
        let c = Cmos::new(0);
        let (rd, wr) = rw(&c);
        wr(REG_B, B_24H | B_SET);
        wr(REG_MONTH, 0x13); // month 13
        wr(REG_B, B_24H);
        assert_eq!(c.save().2, 0);
        wr(REG_SECONDS, 0x9a); // not BCD
        assert_eq!(c.save().2, 0);
        assert_ne!(rd(REG_MONTH), 0x13);
        // Read-only registers stay so.
        wr(REG_D, 0);
        wr(REG_A, 0xa6);
        assert_eq!((rd(REG_D), rd(REG_A)), (0x80, 0x26));
    }
}
