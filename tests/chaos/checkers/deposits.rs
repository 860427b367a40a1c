//! Guaranteed delivery: `demo:deposit` transactions (positive amounts) judged from what the
//! clients saw, the transaction records and the final balances.
//!
//! - Every tid a client saw succeed is `done` in the array with the balance the client saw.
//! - Per account, the `done` deposits' stored balances, in order, climb by exactly their amounts
//!   from 0 (each applied once, one after the other), and the final balance is their sum: a
//!   deposit applied twice, or applied without being `done`, breaks one or the other.
//! - A tid that never succeeded for its client either is `done` (applied once, later or unseen)
//!   or moved nothing; the report says which.

use std::collections::BTreeMap;

/// One transaction of the workload.
#[derive(Debug, Clone)]
pub struct Deposit {
    pub tid: String,
    pub account: String,
    pub amount: i64,
    /// The balance a client was answered, if it saw the transaction succeed.
    pub client_balance: Option<i64>,
    /// The record's state at the end (`done`, `running`, `expired`, ...; `missing` if none).
    pub state: String,
    /// The balance the record keeps as the transaction's result, if done.
    pub stored_balance: Option<i64>,
}

/// What [`check_deposits`] found.
#[derive(Debug, Default)]
pub struct DepositReport {
    pub transactions: usize,
    pub client_succeeded: usize,
    /// Tids that never succeeded for their client but are done (applied once).
    pub done_unseen: Vec<String>,
    /// Tids that never succeeded and moved nothing.
    pub not_applied: Vec<String>,
    pub anomalies: Vec<String>,
}

/// Checks the deposits against the final balance of each account.
pub fn check_deposits(deposits: &[Deposit], finals: &BTreeMap<String, i64>) -> DepositReport {
    let mut report = DepositReport {
        transactions: deposits.len(),
        ..DepositReport::default()
    };
    let mut done: BTreeMap<&str, Vec<&Deposit>> = BTreeMap::new();
    for d in deposits {
        if let Some(seen) = d.client_balance {
            report.client_succeeded += 1;
            if d.state != "done" || d.stored_balance != Some(seen) {
                report.anomalies.push(format!(
                    "{}: the client saw it succeed with balance {seen}, the array says {} with {:?}",
                    d.tid, d.state, d.stored_balance
                ));
            }
        } else if d.state == "done" {
            report.done_unseen.push(d.tid.clone());
        } else {
            report.not_applied.push(d.tid.clone());
        }
        if d.state == "done" {
            done.entry(d.account.as_str()).or_default().push(d);
        }
    }
    let accounts: std::collections::BTreeSet<&str> = deposits
        .iter()
        .map(|d| d.account.as_str())
        .chain(finals.keys().map(String::as_str))
        .collect();
    for account in accounts {
        let mut list = done.remove(account).unwrap_or_default();
        list.sort_by_key(|d| d.stored_balance);
        let mut balance = 0i64;
        for d in &list {
            let expected = balance + d.amount;
            if d.stored_balance != Some(expected) {
                report.anomalies.push(format!(
                    "account {account}: {} (amount {}) stored balance {:?}, expected {expected} after the deposits before it",
                    d.tid, d.amount, d.stored_balance
                ));
            }
            balance = d.stored_balance.unwrap_or(expected);
        }
        let sum: i64 = list.iter().map(|d| d.amount).sum();
        let last = finals.get(account).copied().unwrap_or(0);
        if last != sum {
            report.anomalies.push(format!(
                "account {account}: final balance {last}, but its done deposits sum to {sum} (a deposit applied twice, or \
                 applied without its transaction being done)"
            ));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deposit(tid: &str, amount: i64, seen: Option<i64>, state: &str, stored: Option<i64>) -> Deposit {
        Deposit {
            tid: tid.into(),
            account: "a".into(),
            amount,
            client_balance: seen,
            state: state.into(),
            stored_balance: stored,
        }
    }

    fn clean() -> Vec<Deposit> {
        vec![
            deposit("t1", 5, Some(5), "done", Some(5)),
            deposit("t2", 3, Some(8), "done", Some(8)),
            deposit("t3", 2, None, "done", Some(10)),
            deposit("t4", 7, None, "running", None),
        ]
    }

    fn finals(balance: i64) -> BTreeMap<String, i64> {
        BTreeMap::from([("a".to_string(), balance)])
    }

    #[test]
    fn a_clean_history_passes_and_says_which_tids_never_succeeded() {
        let report = check_deposits(&clean(), &finals(10));
        assert!(report.anomalies.is_empty(), "{report:#?}");
        assert_eq!(
            (report.done_unseen.clone(), report.not_applied.clone()),
            (vec!["t3".to_string()], vec!["t4".to_string()])
        );
    }

    #[test]
    fn a_planted_double_execution_is_caught() {
        // t2 applied twice: the balance has 3 more than the done deposits explain.
        let report = check_deposits(&clean(), &finals(13));
        assert!(
            report.anomalies.iter().any(|a| a.contains("applied twice")),
            "{report:#?}"
        );
        // Or its second application is what a later deposit's result shows.
        let mut d = clean();
        d[2].stored_balance = Some(13);
        let report = check_deposits(&d, &finals(13));
        assert!(
            report.anomalies.iter().any(|a| a.contains("expected 10")),
            "{report:#?}"
        );
    }

    #[test]
    fn a_success_the_array_does_not_know_is_caught() {
        let mut d = clean();
        d[1].state = "expired".into();
        d[1].stored_balance = None;
        let report = check_deposits(&d, &finals(7));
        assert!(
            report.anomalies.iter().any(|a| a.contains("the client saw it succeed")),
            "{report:#?}"
        );
    }
}
