//! ACPI tables (RSDP, XSDT, FADT, DSDT, MADT, MCFG) and the hardware-reduced sleep and reset
//! registers.
//!
//! Why ACPI and not MP tables: Linux finds ECAM only through MCFG (without it, config space past
//! 256 bytes, where PCIe extended capabilities live, is unreachable), and a hardware-reduced FADT
//! gives the guest a clean poweroff (sleep control register, S5) and reset ([`RESET_PORT`])
//! with no PM1/GPE/SCI emulation. The DSDT describes the host bridge (bus range, I/O and memory
//! windows, `_PRT` with every slot's INTx → IOAPIC pin), the ECAM window as a motherboard
//! resource, COM1, the RTC, and a power button behind a Generic Event Device on [`GED_GSI`].
//! The tables live in the BIOS area at [`ACPI_START`], where Linux also scans for the RSDP; the
//! zero page carries the address too.

use std::sync::Arc;

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::IntoBytes;

use crate::bus::{Bus, BusDevice};
use crate::irq::intx_gsi;
use crate::memory::{
    ECAM_SIZE, ECAM_START, IOAPIC_START, LAPIC_START, PCI_MMIO32_SIZE, PCI_MMIO32_START,
};
use crate::{Error, ExitSender, VmExit};

/// Where the tables start (RSDP first).
pub const ACPI_START: u64 = 0xe0000;
/// End of the table area (the reset vector's 16 bytes follow).
pub const ACPI_END: u64 = RESET_VECTOR;
/// The x86 reset vector, F000:FFF0. There is no BIOS behind it, but Linux on a hardware-reduced
/// platform without EFI reboots by jumping there in real mode (its reboot order is ACPI reset
/// register, keyboard, EFI, then "BIOS", and with no EFI it chooses EFI first), and so may
/// other guests: [`RESET_STUB`] there writes the reset register.
pub const RESET_VECTOR: u64 = 0xffff0;
/// Real-mode code at [`RESET_VECTOR`]: `mov dx, RESET_PORT; mov al, RESET_VALUE; out dx, al;
/// cli; hlt; jmp $-1` (back to the hlt).
pub const RESET_STUB: [u8; 10] = [
    0xba,
    RESET_PORT as u8,
    (RESET_PORT >> 8) as u8,
    0xb0,
    RESET_VALUE,
    0xee,
    0xfa,
    0xf4,
    0xeb,
    0xfd,
];
/// Sleep control register (hardware-reduced ACPI), one byte.
pub const SLEEP_CONTROL_PORT: u64 = 0x600;
/// Sleep status register, one byte.
pub const SLEEP_STATUS_PORT: u64 = 0x601;
/// The ACPI reset register (FADT RESET_REG). Not 0xCF9: writes there are buffered with
/// CONFIG_ADDRESS's (see [`crate::coalesced`]) and would wait for the next exit, where this
/// one exits at once.
pub const RESET_PORT: u64 = 0x602;
/// The FADT's RESET_VALUE.
pub const RESET_VALUE: u8 = 0x06;
/// The interrupt of the Generic Event Device (ACPI0013), whose only event is the power button.
pub const GED_GSI: u32 = 9;
/// Sleep type value of S5 in `\_S5`.
pub const SLP_TYP_S5: u8 = 5;
const SLP_EN: u8 = 1 << 5;

const OEM_ID: [u8; 6] = *b"RHYVE ";
const OEM_TABLE: [u8; 8] = *b"RHYVEVM ";

/// What the tables describe.
pub struct Platform {
    /// vCPU count (LAPIC IDs 0..n).
    pub vcpus: u8,
}

/// The sleep control/status registers and the reset register.
pub struct SleepRegs {
    exit: ExitSender,
}

impl BusDevice for SleepRegs {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        if offset == 0 && data[0] & SLP_EN != 0 && (data[0] >> 2) & 7 == SLP_TYP_S5 {
            let _ = self.exit.send(VmExit::PowerOff);
        } else if offset == RESET_PORT - SLEEP_CONTROL_PORT && data[0] == RESET_VALUE {
            let _ = self.exit.send(VmExit::Reset);
        }
    }
}

/// Put the sleep registers on the port bus.
pub fn add_pm_ports(pio: &Bus, exit: ExitSender, tag: usize) -> Result<(), Error> {
    pio.insert(
        SLEEP_CONTROL_PORT,
        RESET_PORT + 1 - SLEEP_CONTROL_PORT,
        Arc::new(SleepRegs { exit }),
        tag,
    )
    .map_err(|e| Error::Other(format!("ACPI sleep registers: {e}")))
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT: header plus AML.
pub fn dsdt() -> Vec<u8> {
    // _PRT: every device number, every pin, straight to its IOAPIC pin (GSI).
    let mut prt_entries: Vec<(u32, u8, u32)> = Vec::new();
    for dev in 0u8..32 {
        for pin in 0u8..4 {
            prt_entries.push(((u32::from(dev) << 16) | 0xffff, pin, intx_gsi(dev, pin + 1)));
        }
    }
    let prt_pkgs: Vec<aml::Package> = prt_entries
        .iter()
        .map(|(a, p, g)| aml::Package::new(vec![a, p, &aml::ZERO, g]))
        .collect();
    let prt_refs: Vec<&dyn Aml> = prt_pkgs.iter().map(|p| p as &dyn Aml).collect();
    let prt = aml::Package::new(prt_refs);

    let mut body = Vec::new();
    let bus_range = aml::AddressSpace::new_bus_number(0u16, u16::from(LAST_BUS));
    let cfg_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_lo = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_hi = aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let mem32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        (PCI_MMIO32_START + PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus_range, &cfg_io, &io_lo, &io_hi, &mem32]);
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Name::new("_PRT".into(), &prt),
        ],
    )
    .to_aml_bytes(&mut body);
    let ecam = aml::Memory32Fixed::new(false, ECAM_START as u32, ECAM_SIZE as u32);
    aml::Device::new(
        "_SB_.MRES".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&ecam])),
        ],
    )
    .to_aml_bytes(&mut body);
    let (com1_io, com1_irq) = (
        aml::IO::new(0x3f8, 0x3f8, 0, 8),
        aml::Interrupt::new(true, true, false, false, crate::serial::COM1_IRQ),
    );
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ONE),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    // The RTC, described so that Linux's rtc-cmos binds through PNP (and gets /dev/rtc0). With
    // no IRQ listed it runs without alarms; the platform device Linux makes otherwise asks
    // for ISA IRQ 8, which a hardware-reduced platform does not have, and fails to probe.
    let rtc_io = aml::IO::new(0x70, 0x70, 1, 2);
    aml::Device::new(
        "_SB_.RTC_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&rtc_io])),
        ],
    )
    .to_aml_bytes(&mut body);
    // Hardware-reduced ACPI has no fixed power button: a Generic Event Device interrupts and its
    // _EVT notifies a control-method power button (Linux: evged + the button driver, which
    // reports KEY_POWER to userspace).
    let ged_irq = aml::Interrupt::new(true, true, false, false, GED_GSI);
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&pwrb, &0x80u8);
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&ged_irq])),
            &aml::Method::new("_EVT".into(), 1, true, vec![&notify]),
        ],
    )
    .to_aml_bytes(&mut body);
    aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(&mut body);
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&SLP_TYP_S5, &SLP_TYP_S5, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut body);
    let mut t = acpi_tables::sdt::Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE, 1);
    t.append_slice(&body);
    t.as_slice().to_vec()
}

/// The last PCI bus number the host bridge decodes and MCFG covers. rhyve has no PCI-to-PCI
/// bridges, so bus 0 is all there is; advertising 0..=255 made Linux (whose last bus comes
/// from MCFG) probe every slot of 255 empty buses through 0xCF8/0xCFC at boot, ~16k exits.
pub const LAST_BUS: u8 = 0;

/// FADT IAPC_BOOT_ARCH bit 0: the platform has legacy (ISA) devices.
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;

fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(vcpus, IOAPIC_START as u32, 0));
    bytes(&m)
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    f.reset_reg = GAS::new(GasSpace::SystemIo, 8, 0, AccessSize::ByteAccess, RESET_PORT);
    f.reset_value = RESET_VALUE;
    f.sleep_control_reg = GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        SLEEP_CONTROL_PORT,
    );
    f.sleep_status_reg = GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        SLEEP_STATUS_PORT,
    );
    // IA-PC boot architecture: legacy devices (COM1, the RTC), and no 8042. The i8042 model
    // is there for the reset pulse only; a hardware-reduced platform has no legacy IRQs for
    // its keyboard to use, and with the 8042 flag Linux probes the ports, fails to get IRQ 1
    // and logs a probe error. Without it Linux looks for PNP0303 in the DSDT and, finding
    // none, leaves the controller alone.
    f.iapc_boot_arch = IAPC_LEGACY_DEVICES.into();
    // Ignored on hardware-reduced platforms by the spec, read by Linux's mc146818 code.
    f.century = crate::cmos::REG_CENTURY;
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"RHYVE\0\0\0").into();
    bytes(&f.finalize())
}

fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE, 1);
    m.add_ecam(ECAM_START, 0, 0, LAST_BUS);
    bytes(&m)
}

/// Write all tables to guest memory; returns the RSDP's address.
pub fn write_tables(mem: &GuestMemoryMmap, p: &Platform) -> Result<u64, String> {
    let mut at = ACPI_START + 64; // RSDP (36 bytes) first
    let mut place = |t: &[u8]| -> Result<u64, String> {
        let a = at.next_multiple_of(16);
        if a + t.len() as u64 > ACPI_END {
            return Err("tables overflow the BIOS area".into());
        }
        mem.write_slice(t, GuestAddress(a))
            .map_err(|e| e.to_string())?;
        at = a + t.len() as u64;
        Ok(a)
    };
    let dsdt_addr = place(&dsdt())?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(p.vcpus))?;
    let mcfg_addr = place(&mcfg())?;
    let mut x = XSDT::new(OEM_ID, OEM_TABLE, 1);
    for a in [fadt_addr, madt_addr, mcfg_addr] {
        x.add_entry(a);
    }
    let xsdt_addr = place(&bytes(&x))?;
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(rsdp.as_bytes(), GuestAddress(ACPI_START))
        .map_err(|e| e.to_string())?;
    mem.write_slice(&RESET_STUB, GuestAddress(RESET_VECTOR))
        .map_err(|e| e.to_string())?;
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_well_formed() {
        let (mem, _f) = crate::memory::create(32 << 20).unwrap();
        let rsdp = write_tables(&mem, &Platform { vcpus: 2 }).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let table = |a: u64| {
            let mut h = [0u8; 8];
            mem.read_slice(&mut h, GuestAddress(a)).unwrap();
            let mut t = vec![0u8; u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize];
            mem.read_slice(&mut t, GuestAddress(a)).unwrap();
            assert!(
                checksum_ok(&t),
                "checksum of {:?}",
                std::str::from_utf8(&t[..4])
            );
            t
        };
        let x = table(xsdt);
        let mut sigs: Vec<String> = x[36..]
            .chunks(8)
            .map(|c| {
                String::from_utf8_lossy(&table(u64::from_le_bytes(c.try_into().unwrap()))[..4])
                    .into_owned()
            })
            .collect();
        sigs.sort();
        assert_eq!(sigs, ["APIC", "FACP", "MCFG"]);
        let fadt_addr = u64::from_le_bytes(x[36..44].try_into().unwrap());
        let fadt = table(fadt_addr);
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let d = table(dsdt_addr);
        assert_eq!(&d[..4], b"DSDT");
        // The MADT lists both LAPICs and the IOAPIC.
        let madt = table(u64::from_le_bytes(x[44..52].try_into().unwrap()));
        assert_eq!(madt.len(), 44 + 2 * 8 + 12);
        // FADT: IAPC_BOOT_ARCH (offset 109) says legacy devices and no 8042; CENTURY (108)
        // names the RTC's century register.
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), 0x0001);
        assert_eq!(fadt[108], 0x32);
        // MCFG: one allocation, segment 0, buses 0..=LAST_BUS (offsets 44 + 10/11).
        let mcfg = table(u64::from_le_bytes(x[52..60].try_into().unwrap()));
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!(
            u64::from_le_bytes(mcfg[44..52].try_into().unwrap()),
            ECAM_START
        );
        assert_eq!((mcfg[54], mcfg[55]), (0, LAST_BUS));
        // The DSDT has the RTC as PNP0B00 (EISA id 0x000bd041 little-endian: 41 d0 0b 00)
        // with its two ports at 0x70 and no IRQ descriptor of its own.
        let pnp0b00 = [0x41u8, 0xd0, 0x0b, 0x00];
        let at = d
            .windows(4)
            .position(|w| w == pnp0b00)
            .expect("PNP0B00 in the DSDT");
        // IO descriptor: 0x47, decode16, min 0x0070, max 0x0070, align 1, length 2.
        let io = [0x47u8, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02];
        let crs = d[at..]
            .windows(8)
            .position(|w| w == io)
            .expect("RTC IO descriptor");
        assert!(crs < 40, "the IO descriptor belongs to the RTC device");
        // The reset vector writes the reset register.
        let mut stub = [0u8; 10];
        mem.read_slice(&mut stub, GuestAddress(RESET_VECTOR))
            .unwrap();
        assert_eq!(
            stub,
            [0xba, 0x02, 0x06, 0xb0, 0x06, 0xee, 0xfa, 0xf4, 0xeb, 0xfd]
        );
        // A hardware-reduced platform without the 8042 flag: no PNP0303 either.
        assert!(!d.windows(4).any(|w| w == [0x41, 0xd0, 0x03, 0x03]));
    }
}
