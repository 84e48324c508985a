use super::*;

#[test]
fn plan_lists_every_step_in_order_with_skips() {
    let settings = Settings::default();
    let steps: Vec<&str> = plan(&settings).iter().map(|s| s.step.as_str()).collect();
    assert_eq!(
        steps,
        [
            "stop-jobs",
            "stop-k3s",
            "clean-leftovers",
            "flush-wal",
            "sync",
            "unmount-data",
            "release-inhibitor"
        ]
    );
    let planned = plan(&settings);
    assert!(planned[1].skip.as_deref().unwrap().contains("k3s"));
    assert!(planned[3].skip.as_deref().unwrap().contains("WAL"));
    assert!(planned[5].skip.as_deref().unwrap().contains("volume"));
    assert!(total_deadline(&planned) > Duration::from_secs(60));
}
