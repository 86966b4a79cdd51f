//! Saying an error with its causes. Adapters' errors keep their cause as their `source` and
//! also say it in their own message (so a log line of the error alone is complete); printing
//! the whole chain then names each cause once.

/// The error and its causes, each once: a cause its parent's message already ends with is
/// not repeated.
pub fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let line = cause.to_string();
        if text.ends_with(&line) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&line);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusError;

    #[test]
    fn a_cause_already_in_its_parents_message_is_said_once() {
        let io = std::io::Error::other("connection refused");
        let error = anyhow::Error::from(BusError::transient("connecting to NATS", io))
            .context("starting the service");
        assert_eq!(
            describe(&error),
            "starting the service: connecting to NATS: connection refused"
        );
        let bus = BusError::transient("connecting to NATS", std::io::Error::other("refused"));
        let source = std::error::Error::source(&bus).map(ToString::to_string);
        assert_eq!(
            source.as_deref(),
            Some("refused"),
            "the cause is kept as the source"
        );
    }
}
