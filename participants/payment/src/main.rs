//! `payment-service`: the payment participant of the demo saga.

use std::process::ExitCode;

use payment_service::{PaymentHandler, PaymentReader};
use sagad_participant::{Parts, ServiceSpec};
use sagad_proto::demo::v1::payments_server::PaymentsServer;
use tonic::service::Routes;

/// The payment service's own flags.
#[derive(Debug, Clone, clap::Args)]
struct PaymentArgs {
    /// Balance of a customer's account when first seen, in cents
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(i64).range(0..))]
    default_balance_cents: i64,
}

fn main() -> ExitCode {
    let spec = ServiceSpec::new(
        "payment-service",
        "127.0.0.1:50062",
        payment_service::migrator(),
    )
    .about(
        "The payment participant of sagad's demo saga (order_fulfillment): ChargePayment debits \
         the customer's account or refuses INSUFFICIENT_FUNDS, RefundPayment (its compensation) \
         credits it back. Serves sagad.participant.v1.Participant and the \
         sagad.demo.v1.Payments read service, over its own database.",
    );
    sagad_participant::run(spec, |args: PaymentArgs, pool| async move {
        let reader = PaymentsServer::new(PaymentReader::new(pool, args.default_balance_cents));
        Ok(Parts::new(PaymentHandler::new(args.default_balance_cents))
            .with_routes(Routes::new(reader)))
    })
}
