//! Interrupt routing: MSI/MSI-X through KVM GSI routes + irqfd, INTx through the in-kernel IOAPIC.
//!
//! [`IrqRouter`] owns the VM's GSI routing table. GSIs 0–23 keep KVM's default wiring (IOAPIC pin
//! = GSI, plus the PICs for 0–15); MSI routes are allocated above them. Each PCI function gets a
//! [`DeviceIrq`], the [`pci::InterruptSink`] its model raises interrupts through:
//! * `route_changed(vector, Some(msg))` (the guest programmed or unmasked a vector) installs or
//!   updates a GSI route for the message and binds an irqfd to it, once per vector;
//! * `msi(msg)` then only writes that vector's irqfd, no ioctl; a message without a route (MSI
//!   before `route_changed`, or a stale message) falls back to `KVM_SIGNAL_MSI`;
//! * `intx(pin, level)` drives the IOAPIC pin of the slot's swizzled PCI interrupt line.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, kvm_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use pci::{InterruptSink, MsiMessage};
use vmm_sys_util::eventfd::EventFd;

/// Number of IOAPIC pins (and of GSIs reserved for them).
pub const IOAPIC_PINS: u32 = 24;
/// First IOAPIC pin used for PCI INTx (pins 16–23, like a PC's PIRQ lines).
pub const PCI_INTX_BASE: u32 = 16;
/// Most routes KVM accepts (KVM_CAP_IRQ_ROUTING reports 4096 here).
const MAX_GSI: u32 = 4096;

/// Errors changing interrupt routing.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// Out of GSIs.
    #[error("no free GSI for an MSI route")]
    NoGsi,
    /// A KVM ioctl failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// eventfd creation failed.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
}

/// The IOAPIC pin a PCI function's INTx `pin` (1 = INTA…) is wired to: the usual swizzle by
/// device number over the eight PCI interrupt lines.
pub fn intx_gsi(device: u8, pin: u8) -> u32 {
    PCI_INTX_BASE + (u32::from(device) + u32::from(pin.max(1)) - 1) % 8
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    }
}

fn msi_entry(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: msg.addr as u32,
                address_hi: (msg.addr >> 32) as u32,
                data: msg.data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

struct RouterState {
    msi_routes: BTreeMap<u32, MsiMessage>,
    free: Vec<u32>,
    next: u32,
}

/// The VM's GSI routing table.
pub struct IrqRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
}

impl IrqRouter {
    /// Install the default routes (GSI n → IOAPIC pin n; GSI 0–15 also → PIC) in KVM.
    pub fn new(vm: Arc<VmFd>) -> Result<Self, IrqError> {
        let r = IrqRouter {
            vm,
            state: Mutex::new(RouterState {
                msi_routes: BTreeMap::new(),
                free: Vec::new(),
                next: IOAPIC_PINS,
            }),
        };
        r.commit(&r.state.lock().unwrap_or_else(|e| e.into_inner()))?;
        Ok(r)
    }

    /// The VM this router programs.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    fn commit(&self, st: &RouterState) -> Result<(), IrqError> {
        let mut entries = Vec::new();
        for gsi in 0..IOAPIC_PINS {
            entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            // The Generic Event Device (power button) is an IOAPIC interrupt only, as in
            // hardware-reduced ACPI: a guest that left the 8259 unprogrammed must not get it.
            if gsi < 16 && gsi != crate::acpi::GED_GSI {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                entries.push(irqchip_entry(gsi, chip, gsi % 8));
            }
        }
        entries.extend(st.msi_routes.iter().map(|(&gsi, &m)| msi_entry(gsi, m)));
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| IrqError::NoGsi)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| IrqError::Kvm("KVM_SET_GSI_ROUTING", e))
    }

    /// Allocate a GSI routed to `msg`.
    pub fn add_msi(&self, msg: MsiMessage) -> Result<u32, IrqError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let gsi = match st.free.pop() {
            Some(g) => g,
            None if st.next < MAX_GSI => {
                st.next += 1;
                st.next - 1
            }
            None => return Err(IrqError::NoGsi),
        };
        st.msi_routes.insert(gsi, msg);
        if let Err(e) = self.commit(&st) {
            st.msi_routes.remove(&gsi);
            st.free.push(gsi);
            return Err(e);
        }
        Ok(gsi)
    }

    /// Point `gsi` at a new message.
    pub fn update_msi(&self, gsi: u32, msg: MsiMessage) -> Result<(), IrqError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.msi_routes.insert(gsi, msg) == Some(msg) {
            return Ok(());
        }
        self.commit(&st)
    }

    /// Deliver `msg` once without a route.
    pub fn signal_msi(&self, msg: MsiMessage) {
        let m = kvm_msi {
            address_lo: msg.addr as u32,
            address_hi: (msg.addr >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        if let Err(e) = self.vm.signal_msi(m) {
            log::warn!("KVM_SIGNAL_MSI {:#x}/{:#x}: {e}", msg.addr, msg.data);
        }
    }

    /// Set the level of IOAPIC pin `gsi`.
    pub fn set_line(&self, gsi: u32, level: bool) {
        if let Err(e) = self.vm.set_irq_line(gsi, level) {
            log::warn!("KVM_IRQ_LINE {gsi}: {e}");
        }
    }
}

struct Vector {
    gsi: u32,
    fd: EventFd,
    /// The message the route carries while the vector is live; `None` while masked.
    live: Option<MsiMessage>,
}

/// Interrupt counters of one device.
#[derive(Debug, Default)]
pub struct IrqCounters {
    /// MSI/MSI-X delivered through an irqfd.
    pub irqfd: AtomicU64,
    /// MSI delivered with KVM_SIGNAL_MSI (no route yet).
    pub signal_msi: AtomicU64,
    /// INTx assertions.
    pub intx: AtomicU64,
    /// Route (re)programmings.
    pub route_updates: AtomicU64,
}

/// One PCI function's interrupt sink under KVM.
pub struct DeviceIrq {
    router: Arc<IrqRouter>,
    device: u8,
    vectors: Mutex<BTreeMap<u16, Vector>>,
    /// Counters for `--stats`.
    pub counters: IrqCounters,
}

impl DeviceIrq {
    /// The sink for the function at PCI device number `device`.
    pub fn new(router: Arc<IrqRouter>, device: u8) -> Self {
        DeviceIrq {
            router,
            device,
            vectors: Mutex::new(BTreeMap::new()),
            counters: IrqCounters::default(),
        }
    }

    fn set_route(&self, vector: u16, msg: MsiMessage) -> Result<(), IrqError> {
        let mut v = self.vectors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = v.get_mut(&vector) {
            if e.live != Some(msg) {
                self.router.update_msi(e.gsi, msg)?;
                self.counters.route_updates.fetch_add(1, Ordering::Relaxed);
            }
            e.live = Some(msg);
            return Ok(());
        }
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(IrqError::EventFd)?;
        let gsi = self.router.add_msi(msg)?;
        self.router
            .vm()
            .register_irqfd(&fd, gsi)
            .map_err(|e| IrqError::Kvm("KVM_IRQFD", e))?;
        self.counters.route_updates.fetch_add(1, Ordering::Relaxed);
        v.insert(
            vector,
            Vector {
                gsi,
                fd,
                live: Some(msg),
            },
        );
        Ok(())
    }
}

impl InterruptSink for DeviceIrq {
    fn msi(&self, msg: MsiMessage) {
        {
            let v = self.vectors.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = v.values().find(|e| e.live == Some(msg)) {
                if e.fd.write(1).is_ok() {
                    self.counters.irqfd.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        self.counters.signal_msi.fetch_add(1, Ordering::Relaxed);
        self.router.signal_msi(msg);
    }

    fn intx(&self, pin: u8, asserted: bool) {
        if asserted {
            self.counters.intx.fetch_add(1, Ordering::Relaxed);
        }
        self.router.set_line(intx_gsi(self.device, pin), asserted);
    }

    fn route_changed(&self, vector: u16, msg: Option<MsiMessage>) {
        match msg {
            Some(m) => {
                if let Err(e) = self.set_route(vector, m) {
                    log::warn!(
                        "device {}: MSI vector {vector}: {e}; using KVM_SIGNAL_MSI",
                        self.device
                    );
                }
            }
            None => {
                if let Some(e) = self
                    .vectors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(&vector)
                {
                    e.live = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swizzle() {
        assert_eq!(intx_gsi(0, 1), 16);
        assert_eq!(intx_gsi(4, 1), 20);
        assert_eq!(intx_gsi(4, 4), 23);
        assert_eq!(intx_gsi(5, 4), 16);
    }
}
