//! In-process tests: a driver modelled on Linux's ahci/libata runs every command and error path
//! against the controller over real guest memory.

mod ata_cmds;
mod atapi_cmds;
mod bad_input;
mod config;
mod crash;
mod hba_regs;
mod hostile;
mod ncq;
mod state;
