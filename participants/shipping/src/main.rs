//! `shipping-service`: the shipping participant of the demo saga.

use std::process::ExitCode;

use sagad_participant::{Parts, ServiceSpec};
use sagad_proto::demo::v1::shipping_server::ShippingServer;
use shipping_service::{ShipmentReader, ShippingHandler};
use tonic::service::Routes;

/// The shipping service's own flags.
#[derive(Debug, Clone, clap::Args)]
struct ShippingArgs {
    /// Comma list of destination countries it refuses
    #[arg(long, default_value = "AQ", value_delimiter = ',')]
    unsupported_countries: Vec<String>,
}

fn main() -> ExitCode {
    let spec = ServiceSpec::new(
        "shipping-service",
        "127.0.0.1:50063",
        shipping_service::migrator(),
    )
    .about(
        "The shipping participant of sagad's demo saga (order_fulfillment): ScheduleShipment \
         schedules the order's parcel or refuses UNSUPPORTED_DESTINATION, CancelShipment (its \
         compensation) cancels it. Serves sagad.participant.v1.Participant and the \
         sagad.demo.v1.Shipping read service, over its own database.",
    );
    sagad_participant::run(spec, |args: ShippingArgs, pool| async move {
        let reader = ShippingServer::new(ShipmentReader::new(pool));
        Ok(Parts::new(ShippingHandler::new(args.unsupported_countries))
            .with_routes(Routes::new(reader)))
    })
}
