//! The one table of supported commands. Dispatch refuses what is not in it (Invalid Opcode),
//! the Commands Supported and Effects log is built from it, and so are Identify Controller's
//! OACS and the command bits of ONCS: the three cannot disagree.

use crate::config::CtrlConfig;
use crate::spec::{AdminOpcode, IoOpcode};

/// Commands Supported and Effects data bits (Base spec Figure 210).
pub mod effects {
    /// Command Supported.
    pub const CSUPP: u32 = 1 << 0;
    /// Logical Block Content Change.
    pub const LBCC: u32 = 1 << 1;
    /// Namespace Capability Change.
    pub const NCC: u32 = 1 << 2;
    /// Command Submission and Execution: single namespace at a time.
    pub const CSE_SINGLE_NS: u32 = 1 << 16;
}

/// OACS bits (Identify Controller, Figure 275).
pub mod oacs {
    /// Format NVM supported.
    pub const FORMAT: u16 = 1 << 1;
    /// Device Self-test supported.
    pub const DEVICE_SELF_TEST: u16 = 1 << 4;
    /// Doorbell Buffer Config supported.
    pub const DOORBELL_BUFFER_CONFIG: u16 = 1 << 8;
}

/// ONCS bits (Identify Controller, Figure 275).
pub mod oncs {
    /// Compare supported.
    pub const COMPARE: u16 = 1 << 0;
    /// Dataset Management supported.
    pub const DSM: u16 = 1 << 2;
    /// Write Zeroes supported.
    pub const WRITE_ZEROES: u16 = 1 << 3;
    /// Save field in Set Features and Select field in Get Features supported.
    pub const SAVE_SELECT: u16 = 1 << 4;
    /// Timestamp feature supported.
    pub const TIMESTAMP: u16 = 1 << 6;
    /// Verify supported.
    pub const VERIFY: u16 = 1 << 7;
}

/// One supported command.
pub struct Command<Op> {
    /// Its opcode.
    pub op: Op,
    /// Its Commands Supported and Effects entry.
    pub effects: u32,
    /// The OACS (admin) or ONCS (I/O) bit that advertises it, if any.
    pub advertised_by: u16,
    /// Whether this configuration supports it.
    pub enabled: fn(&CtrlConfig) -> bool,
}

fn always(_: &CtrlConfig) -> bool {
    true
}

use effects::{CSE_SINGLE_NS, CSUPP, LBCC, NCC};

/// Admin commands.
pub const ADMIN: &[Command<AdminOpcode>] = &[
    Command {
        op: AdminOpcode::DELETE_IO_SQ,
        effects: CSUPP,
        advertised_by: 0,
        enabled: always,
    },
    Command {
        op: AdminOpcode::CREATE_IO_SQ,
        effects: CSUPP,
        advertised_by: 0,
        enabled: always,
    },
    Command {
        op: AdminOpcode::GET_LOG_PAGE,
        effects: CSUPP,
        advertised_by: 0,
        enabled: always,
    },
    Command {
        op: AdminOpcode::DELETE_IO_CQ,
        effects: CSUPP,
        advertised_by: 0,
        enabled: always,
    },
    Command {
        op: AdminOpcode::CREATE_IO_CQ,
        effects: CSUPP,
        advertised_by: 0,
        enabled: always,
    },
    Command {
        op: AdminOpcode::IDENTIFY,
        effects: CSUPP,
        advertised_by: 0,
        enabled: always,
    },
    Command {
        op: AdminOpcode::ABORT,
        effects: CSUPP,
        advertised_by: 0,
        enabled: always,
    },
    Command {
        op: AdminOpcode::SET_FEATURES,
        effects: CSUPP,
        advertised_by: 0,
        enabled: always,
    },
    Command {
        op: AdminOpcode::GET_FEATURES,
        effects: CSUPP,
        advertised_by: 0,
        enabled: always,
    },
    Command {
        op: AdminOpcode::ASYNC_EVENT_REQUEST,
        effects: CSUPP,
        advertised_by: 0,
        enabled: always,
    },
    Command {
        op: AdminOpcode::DEVICE_SELF_TEST,
        effects: CSUPP,
        advertised_by: oacs::DEVICE_SELF_TEST,
        enabled: always,
    },
    Command {
        op: AdminOpcode::DOORBELL_BUFFER_CONFIG,
        effects: CSUPP,
        advertised_by: oacs::DOORBELL_BUFFER_CONFIG,
        enabled: |cfg| cfg.dbbuf,
    },
    Command {
        op: AdminOpcode::FORMAT_NVM,
        effects: CSUPP | LBCC | NCC | CSE_SINGLE_NS,
        advertised_by: oacs::FORMAT,
        enabled: always,
    },
];

/// NVM command set I/O commands.
pub const IO: &[Command<IoOpcode>] = &[
    Command {
        op: IoOpcode::FLUSH,
        effects: CSUPP,
        advertised_by: 0,
        enabled: always,
    },
    Command {
        op: IoOpcode::WRITE,
        effects: CSUPP | LBCC,
        advertised_by: 0,
        enabled: always,
    },
    Command {
        op: IoOpcode::READ,
        effects: CSUPP,
        advertised_by: 0,
        enabled: always,
    },
    Command {
        op: IoOpcode::COMPARE,
        effects: CSUPP,
        advertised_by: oncs::COMPARE,
        enabled: always,
    },
    Command {
        op: IoOpcode::WRITE_ZEROES,
        effects: CSUPP | LBCC,
        advertised_by: oncs::WRITE_ZEROES,
        enabled: always,
    },
    Command {
        op: IoOpcode::DATASET_MANAGEMENT,
        effects: CSUPP | LBCC,
        advertised_by: oncs::DSM,
        enabled: |cfg| cfg.dsm,
    },
    Command {
        op: IoOpcode::VERIFY,
        effects: CSUPP,
        advertised_by: oncs::VERIFY,
        enabled: always,
    },
];

/// The admin command `op`, if this configuration supports it.
pub fn admin(cfg: &CtrlConfig, op: AdminOpcode) -> Option<&'static Command<AdminOpcode>> {
    ADMIN.iter().find(|c| c.op == op && (c.enabled)(cfg))
}

/// The I/O command `op`, if this configuration supports it.
pub fn io(cfg: &CtrlConfig, op: IoOpcode) -> Option<&'static Command<IoOpcode>> {
    IO.iter().find(|c| c.op == op && (c.enabled)(cfg))
}

/// OACS for this configuration.
pub fn oacs_bits(cfg: &CtrlConfig) -> u16 {
    ADMIN
        .iter()
        .filter(|c| (c.enabled)(cfg))
        .fold(0, |b, c| b | c.advertised_by)
}

/// ONCS for this configuration: the optional commands, and the Get/Set Features abilities.
pub fn oncs_bits(cfg: &CtrlConfig) -> u16 {
    IO.iter()
        .filter(|c| (c.enabled)(cfg))
        .fold(oncs::SAVE_SELECT | oncs::TIMESTAMP, |b, c| {
            b | c.advertised_by
        })
}

/// The Commands Supported and Effects log page (CSI 0), 4096 bytes.
pub fn effects_log(cfg: &CtrlConfig) -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    let mut put = |at: usize, e: u32| v[at..at + 4].copy_from_slice(&e.to_le_bytes());
    for c in ADMIN.iter().filter(|c| (c.enabled)(cfg)) {
        put(usize::from(c.op.0) * 4, c.effects);
    }
    for c in IO.iter().filter(|c| (c.enabled)(cfg)) {
        put(1024 + usize::from(c.op.0) * 4, c.effects);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> CtrlConfig {
        let spec = pci::SlotSpec::parse(&format!("4,nvme,ram=1{extra}")).unwrap();
        CtrlConfig::from_spec(&spec).unwrap()
    }

    #[test]
    fn effects_log_oacs_and_oncs_follow_the_options() {
        for (extra, dbbuf, dsm) in [("", true, true), (",dbbuf=off,dsm=disable", false, false)] {
            let c = cfg(extra);
            let log = effects_log(&c);
            let entry = |base: usize, op: u8| {
                u32::from_le_bytes(log[base + usize::from(op) * 4..][..4].try_into().unwrap())
            };
            assert_eq!(entry(0, AdminOpcode::DOORBELL_BUFFER_CONFIG.0) != 0, dbbuf);
            assert_eq!(oacs_bits(&c) & oacs::DOORBELL_BUFFER_CONFIG != 0, dbbuf);
            assert_eq!(
                admin(&c, AdminOpcode::DOORBELL_BUFFER_CONFIG).is_some(),
                dbbuf
            );
            assert_eq!(entry(1024, IoOpcode::DATASET_MANAGEMENT.0) != 0, dsm);
            assert_eq!(oncs_bits(&c) & oncs::DSM != 0, dsm);
            assert_eq!(io(&c, IoOpcode::DATASET_MANAGEMENT).is_some(), dsm);
            assert_eq!(entry(0, AdminOpcode::KEEP_ALIVE.0), 0);
            assert!(admin(&c, AdminOpcode::KEEP_ALIVE).is_none());
            assert!(io(&c, IoOpcode::WRITE_UNCORRECTABLE).is_none());
        }
    }
}
