//! The fuzz watchdog: an operation that spins past `MAX_OP` aborts the process, naming it.
use std::process::Command;

const CHILD: &str = "RHYVE_FUZZ_WATCHDOG_CHILD";

#[test]
fn an_operation_that_spins_aborts_the_process_and_is_named() {
    if std::env::var_os(CHILD).is_some() {
        fuzzing::timed("a quick one", || ());
        fuzzing::timed("the spinning operation", || loop {
            std::hint::spin_loop()
        });
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "an_operation_that_spins_aborts_the_process_and_is_named",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(6), "not aborted: {stderr}");
    assert!(
        stderr.contains("the spinning operation took more than"),
        "{stderr}"
    );
    assert!(!stderr.contains("a quick one"), "{stderr}");
}
