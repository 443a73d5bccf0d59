//! Test helpers for device state: every number of a saved state set to extreme values, one at
//! a time, for campaigns that check a restore refuses damage or survives it.

use serde_json::Value;

/// Values each number is set to.
pub const EXTREMES: [u64; 5] = [0, 1, 0xffff, 0xffff_ffff, u64::MAX];

/// Paths to every number and boolean in `v`; arrays longer than 16 only at their ends (config
/// space alone would be thousands).
pub fn leaves(v: &Value) -> Vec<Vec<String>> {
    fn walk(v: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match v {
            Value::Number(_) | Value::Bool(_) => out.push(path.clone()),
            Value::Array(a) => {
                let n = a.len();
                for (i, x) in a.iter().enumerate() {
                    if n <= 16 || i == 0 || i + 1 == n {
                        path.push(i.to_string());
                        walk(x, path, out);
                        path.pop();
                    }
                }
            }
            Value::Object(o) => {
                for (k, x) in o {
                    path.push(k.clone());
                    walk(x, path, out);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// `v` with the leaf at `path` set to `val` (a boolean takes its low bit).
pub fn mutated(v: &Value, path: &[String], val: u64) -> Value {
    let mut out = v.clone();
    let mut at = &mut out;
    for k in path {
        at = match k.parse::<usize>() {
            Ok(i) => &mut at[i],
            Err(_) => &mut at[k.as_str()],
        };
    }
    *at = if at.is_boolean() {
        (val & 1 != 0).into()
    } else {
        val.into()
    };
    out
}

/// Every mutation of `v`: (what, the mutated state).
pub fn mutations(v: &Value) -> impl Iterator<Item = (String, Value)> + '_ {
    leaves(v).into_iter().flat_map(move |path| {
        EXTREMES
            .iter()
            .map(move |&x| (format!("{} = {x:#x}", path.join(".")), mutated(v, &path, x)))
            .collect::<Vec<_>>()
    })
}

/// Counts panics on every thread from now on (device threads included), for a campaign to
/// assert none happened.
pub fn count_panics() -> &'static std::sync::atomic::AtomicUsize {
    static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |i| {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            prev(i);
        }));
    });
    &PANICS
}

/// A damaged-state campaign over `good`, a device's saved state. For each of its
/// [`mutations`], `restore` builds a fresh device and restores the mutated state into it,
/// answering None when the device refuses; one that took it is resumed and used as a guest
/// would, then returned, and must pause again. Panics unless some mutations were refused and
/// some taken, and unless no thread panicked since [`count_panics`] was first called (a
/// campaign calls it before building its first device).
pub fn campaign(
    good: &Value,
    mut restore: impl FnMut(&Value) -> Option<Box<dyn crate::PciDevice>>,
) {
    let panics = count_panics();
    let (mut refused, mut taken) = (0, 0);
    for (what, bad) in mutations(good) {
        let Some(dev) = restore(&bad) else {
            refused += 1;
            continue;
        };
        taken += 1;
        dev.pause().unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    println!("{refused} refused, {taken} taken");
    assert!(refused > 0 && taken > 0);
    assert_eq!(panics.load(std::sync::atomic::Ordering::SeqCst), 0);
}
