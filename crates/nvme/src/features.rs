//! Get/Set Features state with current, default and capability selection.

use crate::spec::fid;

/// Feature values (current).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Features {
    pub arbitration: u32,
    pub power_state: u32,
    /// Over-temperature threshold for the composite sensor (Kelvin).
    pub temp_over: u16,
    /// Under-temperature threshold (Kelvin).
    pub temp_under: u16,
    pub error_recovery: u32,
    pub volatile_wc: bool,
    /// Allocated I/O queues (0-based NSQA, NCQA).
    pub nsqa: u16,
    pub ncqa: u16,
    /// Number of Queues was set since the last reset.
    pub nq_set: bool,
    pub coalescing: u32,
    /// Per-vector Coalescing Disable.
    pub vector_cd: Vec<bool>,
    pub write_atomicity: u32,
    pub async_event_config: u32,
}

/// Default over-temperature threshold: 70 °C (= WCTEMP).
pub const DEFAULT_TEMP_OVER: u16 = 343;
/// Composite temperature reported: 35 °C.
pub const COMPOSITE_TEMP: u16 = 308;
/// Asynchronous event configuration bits we can generate: SMART critical warnings 0-4 and
/// namespace attribute notices.
pub const AEC_SUPPORTED: u32 = 0x1f | (1 << 8);

impl Features {
    /// Power-on defaults for a controller with `maxq` I/O queue pairs and `vectors` vectors.
    pub fn new(maxq: u16, vectors: usize) -> Self {
        Features {
            arbitration: 0,
            power_state: 0,
            temp_over: DEFAULT_TEMP_OVER,
            temp_under: 0,
            error_recovery: 0,
            volatile_wc: true,
            nsqa: maxq - 1,
            ncqa: maxq - 1,
            nq_set: false,
            coalescing: 0,
            vector_cd: vec![false; vectors.max(1)],
            write_atomicity: 0,
            async_event_config: 0,
        }
    }

    /// A controller reset returns features to their defaults (none are saveable).
    pub fn reset_volatile(&mut self, maxq: u16) {
        *self = Features::new(maxq, self.vector_cd.len());
    }

    /// Whether a feature is namespace-specific (Get Features capabilities bit 1).
    pub fn ns_specific(f: u8) -> bool {
        f == fid::ERROR_RECOVERY
    }

    /// Features this controller implements.
    pub fn supported(f: u8) -> bool {
        matches!(
            f,
            fid::ARBITRATION
                | fid::POWER_MANAGEMENT
                | fid::TEMPERATURE_THRESHOLD
                | fid::ERROR_RECOVERY
                | fid::VOLATILE_WRITE_CACHE
                | fid::NUMBER_OF_QUEUES
                | fid::INTERRUPT_COALESCING
                | fid::INTERRUPT_VECTOR_CONFIG
                | fid::WRITE_ATOMICITY
                | fid::ASYNC_EVENT_CONFIG
                | fid::TIMESTAMP
        )
    }
}
