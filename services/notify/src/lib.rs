//! notify: fans ShipperD events out to webhooks as signed CloudEvents
