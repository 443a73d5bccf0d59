//! Identify data: controller, namespace, namespace lists and identification descriptors.
//!
//! Every field tells the truth about what the controller implements: a driver that trusts ONCS,
//! OACS, VWC, SGLS, MDTS or LPA finds each advertised command and behaviour present.

use zerocopy::{FromZeros, IntoBytes};

use crate::config::CtrlConfig;
use crate::namespace::{Namespace, LBA_FORMATS};
use crate::spec::{IdentifyController, IdentifyNamespace, LbaFormat};

/// PCI vendor ID, also reported in Identify (VID/SSVID).
pub const PCI_VENDOR_ID: u16 = 0xfb5d;
/// PCI device ID.
pub const PCI_DEVICE_ID: u16 = 0x0a0a;
/// IEEE OUI placed in Identify and the EUI-64 values (locally chosen).
pub const IEEE_OUI: [u8; 3] = [0x52, 0x48, 0x59];
/// Abort Command Limit (0's based).
pub const ACL: u8 = 3;
/// Asynchronous Event Request Limit (0's based).
pub const AERL: u8 = 3;
/// Warning composite temperature threshold (K).
pub const WCTEMP: u16 = 343;
/// Critical composite temperature threshold (K).
pub const CCTEMP: u16 = 358;

fn pad(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    let n = s.len().min(dst.len());
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// FNV-1a 64: a stable hash (std's hasher may change between releases, and IDs must not).
fn fnv(seed: u64, parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Identify Controller (CNS 01h).
pub fn controller(cfg: &CtrlConfig, namespaces: &[Namespace]) -> IdentifyController {
    let mut id = IdentifyController::new_zeroed();
    id.vid = PCI_VENDOR_ID;
    id.ssvid = PCI_VENDOR_ID;
    pad(&mut id.sn, &cfg.serial);
    pad(&mut id.mn, &cfg.model);
    pad(&mut id.fr, &cfg.firmware);
    id.rab = 6;
    id.ieee = [IEEE_OUI[2], IEEE_OUI[1], IEEE_OUI[0]];
    id.mdts = cfg.mdts;
    id.cntlid = 1;
    id.ver = crate::NVME_VERSION;
    id.oaes = 1 << 8; // Namespace Attribute Notices
    id.cntrltype = 1; // I/O controller
    id.oacs = crate::commands::oacs_bits(cfg);
    id.acl = ACL;
    id.aerl = AERL;
    id.frmw = (1 << 1) | 1; // one slot, slot 1 read-only
                            // Commands Supported and Effects log, extended data for Get Log Page.
    id.lpa = (1 << 1) | (1 << 2);
    // An extended self-test takes 8 s (within the smallest EDSTT, one minute); one operation
    // at a time runs in the subsystem.
    id.edstt = 1;
    id.dsto = 1;
    id.elpe = (crate::logpage::ERROR_LOG_ENTRIES - 1) as u8;
    id.npss = 0;
    id.wctemp = WCTEMP;
    id.cctemp = CCTEMP;
    let total: u64 = namespaces.iter().map(|n| n.backend.info().capacity).sum();
    id.tnvmcap = u128::from(total).to_le_bytes();
    id.sqes = 0x66;
    id.cqes = 0x44;
    id.nn = namespaces.len() as u32;
    id.oncs = crate::commands::oncs_bits(cfg);
    id.vwc = 0x1 | (0x3 << 1); // present; Flush with NSID FFFFFFFFh supported
    id.sgls = 0x1 | (1 << 16); // SGLs without alignment rules; bit bucket descriptors
    let nqn = format!("nqn.2026-11.io.rhyve:nvme:{}", cfg.serial);
    id.subnqn[..nqn.len()].copy_from_slice(nqn.as_bytes());
    id.psd[0].mp = 2500; // 25 W, in centiwatts
    id
}

/// Identify Namespace (CNS 00h).
pub fn namespace(cfg: &CtrlConfig, ns: &Namespace) -> IdentifyNamespace {
    let mut id = IdentifyNamespace::new_zeroed();
    let nsze = ns.nsze();
    id.nsze = nsze;
    id.ncap = nsze;
    id.nuse = nsze;
    id.nlbaf = (LBA_FORMATS.len() - 1) as u8;
    id.flbas = ns.flbas;
    id.dlfeat = (1 << 3) | 0x1; // Write Zeroes may deallocate; deallocated blocks read zeroes
    id.nvmcap = u128::from(nsze << ns.lba_shift()).to_le_bytes();
    id.nsattr = u8::from(ns.read_only);
    id.nguid = nguid(cfg, ns.nsid);
    id.eui64 = eui64(cfg, ns.nsid);
    for (i, &lbads) in LBA_FORMATS.iter().enumerate() {
        id.lbaf[i] = LbaFormat {
            ms: 0,
            lbads,
            rp: if lbads == 12 { 0 } else { 1 },
        };
    }
    id
}

/// EUI-64 for `nsid`, stable for a given serial.
pub fn eui64(cfg: &CtrlConfig, nsid: u32) -> [u8; 8] {
    let h = fnv(
        cfg.eui64_base,
        &[cfg.serial.as_bytes(), &nsid.to_le_bytes()],
    );
    let mut e = [0u8; 8];
    e[..3].copy_from_slice(&IEEE_OUI);
    e[3..].copy_from_slice(&h.to_be_bytes()[..5]);
    e
}

/// NGUID for `nsid`.
pub fn nguid(cfg: &CtrlConfig, nsid: u32) -> [u8; 16] {
    let a = fnv(1, &[cfg.serial.as_bytes(), &nsid.to_le_bytes()]);
    let b = fnv(2, &[cfg.serial.as_bytes(), &nsid.to_le_bytes()]);
    let mut g = [0u8; 16];
    g[..8].copy_from_slice(&a.to_be_bytes());
    g[8..].copy_from_slice(&b.to_be_bytes());
    g
}

/// UUID for `nsid` (RFC 9562 version 8, name-derived).
pub fn uuid(cfg: &CtrlConfig, nsid: u32) -> [u8; 16] {
    let mut u = nguid(cfg, nsid ^ 0x5555_5555);
    u[6] = (u[6] & 0x0f) | 0x80;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Namespace Identification Descriptor list (CNS 03h): EUI-64, NGUID, UUID, CSI.
pub fn ns_descriptors(cfg: &CtrlConfig, nsid: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(4096);
    let mut add = |typ: u8, data: &[u8]| {
        v.extend_from_slice(&[typ, data.len() as u8, 0, 0]);
        v.extend_from_slice(data);
    };
    add(1, &eui64(cfg, nsid));
    add(2, &nguid(cfg, nsid));
    add(3, &uuid(cfg, nsid));
    add(4, &[0]); // CSI: NVM command set
    v.resize(4096, 0);
    v
}

/// I/O Command Set specific Identify Controller for NVM (CNS 06h, CSI 00h).
pub fn nvm_controller(cfg: &CtrlConfig) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    v[0] = cfg.mdts; // VSL: Verify size limit, same units as MDTS
    v[1] = 0; // WZSL: no limit
    v[3] = 0xff; // DMRL: 255 ranges
    v[4..8].copy_from_slice(&0u32.to_le_bytes()); // DMRSL: no per-range limit
    v
}

/// Active namespace ID list (CNS 02h/07h): NSIDs greater than `after`.
pub fn active_list(namespaces: &[Namespace], after: u32) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    for (i, ns) in namespaces
        .iter()
        .filter(|n| n.nsid > after)
        .take(1024)
        .enumerate()
    {
        v[i * 4..i * 4 + 4].copy_from_slice(&ns.nsid.to_le_bytes());
    }
    v
}

/// Serialize any Identify structure.
pub fn bytes<T: IntoBytes + zerocopy::Immutable>(t: &T) -> Vec<u8> {
    t.as_bytes().to_vec()
}
