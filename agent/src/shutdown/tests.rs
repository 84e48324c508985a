use super::*;

#[test]
fn plan_lists_every_step_in_order_with_skips() {
    let settings = Settings::default();
    let steps: Vec<&str> = plan(&settings).iter().map(|s| s.step.as_str()).collect();
    assert_eq!(
        steps,
        [
            "stop-jobs",
            "flush-wal",
            "stop-k3s",
            "clean-leftovers",
            "sync",
            "unmount-data",
            "release-inhibitor"
        ]
    );
    let planned = plan(&settings);
    assert!(planned[2].skip.as_deref().unwrap().contains("k3s"));
    assert!(planned[5].skip.as_deref().unwrap().contains("volume"));
    assert!(total_deadline(&planned) > Duration::from_secs(60));
}
