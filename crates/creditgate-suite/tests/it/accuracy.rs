//! Accuracy and decrement tests: concurrent workers (closed loop, a little jitter) on
//! 1–5 nodes; exact success counts (no tolerance), exact lowest remaining, every node
//! served verifications and none more than 70 % (from the analytics `node_id`), SQL balance exact within 10 s.

use std::time::Duration;

use creditgate_loadgen::{run, Mode, Stop};
use creditgate_suite::{assert_exact, print_metrics, run_accuracy, setup, Target};

macro_rules! accuracy {
    ($name:ident, $nodes:expr, $credits:expr, $cost:expr, $concurrency:expr, $requests:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            run_accuracy(
                stringify!($name),
                $nodes,
                $credits,
                $cost,
                $concurrency,
                $requests,
            )
            .await;
        }
    };
}

// (nodes, credits, cost, concurrency, requests)
accuracy!(
    accuracy_nodes1_credits100_cost1_c50_r200,
    1,
    100,
    1,
    50,
    200
);
accuracy!(
    accuracy_nodes3_credits100_cost1_c100_r300,
    3,
    100,
    1,
    100,
    300
);
accuracy!(
    accuracy_nodes5_credits500_cost10_c20_r100,
    5,
    500,
    10,
    20,
    100
);
accuracy!(
    accuracy_nodes3_credits1_cost1_c1000_r1000,
    3,
    1,
    1,
    1000,
    1000
);

accuracy!(decrement_nodes1_credits50_cost1_c10_r75, 1, 50, 1, 10, 75);
accuracy!(decrement_nodes3_credits100_cost5_c20_r50, 3, 100, 5, 20, 50);
accuracy!(decrement_nodes5_credits5_cost1_c50_r50, 5, 5, 1, 50, 50);
accuracy!(decrement_nodes3_credits25_cost5_c10_r10, 3, 25, 5, 10, 10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decrement_zero_credits_is_always_exceeded() {
    let r = run_accuracy("decrement zero credits", 3, 0, 1, 10, 30).await;
    assert_eq!((r.valid, r.usage_exceeded), (0, 30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decrement_exact_depletion_is_sequential_nine_to_zero() {
    let s = setup(3, Target::Cluster, 10).await.expect("setup");
    let plan = s.plan(
        1,
        Mode::Closed {
            concurrency: 1,
            think_time: None,
        },
        Stop::Requests(11),
    );
    let r = run(&plan, None).await;
    print_metrics("exact depletion", &r, 10, 10, 1);
    assert_exact(&r, 10, 1);
    assert_eq!(
        r.valid_remaining,
        (0..10).rev().collect::<Vec<u64>>(),
        "9..0 in order"
    );
    assert_eq!(r.usage_exceeded, 1, "the 11th is USAGE_EXCEEDED");
    s.assert_sql_balance(0, Duration::from_secs(10)).await;
    s.teardown().await;
}
