//! `order-service`: the order participant of the demo saga.

use std::process::ExitCode;

use order_service::{OrderHandler, OrderReader};
use sagad_participant::{NoArgs, Parts, ServiceSpec};
use sagad_proto::demo::v1::orders_server::OrdersServer;
use tonic::service::Routes;

fn main() -> ExitCode {
    let spec = ServiceSpec::new(
        "order-service",
        "127.0.0.1:50061",
        order_service::migrator(),
    )
    .about(
        "The order participant of sagad's demo saga (order_fulfillment): CreateOrder makes a \
         PENDING order, CancelOrder (its compensation) cancels it, ApproveOrder approves it. \
         Serves sagad.participant.v1.Participant and the sagad.demo.v1.Orders read service, \
         over its own database.",
    );
    sagad_participant::run(spec, |_: NoArgs, pool| async move {
        let reader = OrdersServer::new(OrderReader::new(pool));
        Ok(Parts::new(OrderHandler).with_routes(Routes::new(reader)))
    })
}
