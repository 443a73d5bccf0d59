//! The device registry: every emulation rhyve knows, by name and alias.

use pci::DeviceRegistry;

/// All built-in devices.
pub fn registry() -> DeviceRegistry {
    let mut r = DeviceRegistry::new();
    r.register(nvme::NAME, &[], nvme::create);
    r.register(ahci::NAME, ahci::ALIASES, ahci::create);
    r.register(virtio::NAME, virtio::ALIASES, virtio::create);
    r
}
