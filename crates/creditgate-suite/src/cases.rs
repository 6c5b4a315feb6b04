// The table of generated cases, shared by `build.rs` (which writes one test per row)
// and the library. Add a row here and a test appears: (nodes, credits, cost, load, seconds).

/// One generated case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Case {
    pub nodes: usize,
    pub credits: u64,
    pub cost: u64,
    pub load: f64,
    pub seconds: u64,
}

const fn case(nodes: usize, credits: u64, cost: u64, load: f64, seconds: u64) -> Case {
    Case {
        nodes,
        credits,
        cost,
        load,
        seconds,
    }
}

/// Realistic combinations of node count, balance, cost and load.
pub const REALISTIC_COMBINATIONS: &[Case] = &[
    case(1, 100, 1, 0.9, 30),
    case(1, 100, 1, 1.0, 30),
    case(1, 100, 1, 2.0, 30),
    case(3, 100, 1, 0.9, 30),
    case(5, 100, 1, 0.9, 30),
    case(3, 100, 1, 1.0, 30),
    case(5, 100, 1, 1.0, 30),
    case(3, 100, 1, 2.0, 30),
    case(5, 100, 1, 2.0, 30),
    case(3, 1000, 10, 0.9, 20),
    case(5, 1000, 10, 1.5, 20),
    case(3, 500, 5, 1.0, 25),
    case(5, 500, 5, 2.0, 25),
    case(1, 10, 1, 0.8, 15),
    case(3, 10, 1, 1.2, 15),
    case(5, 10, 1, 1.5, 15),
    case(3, 100, 20, 1.0, 10),
    case(5, 100, 20, 1.5, 10),
];

/// Extreme edge cases: many nodes, triple load.
pub const EXTREME_EDGE_CASES: &[Case] = &[case(9, 1000, 1, 3.0, 15), case(9, 500, 5, 2.0, 15)];
