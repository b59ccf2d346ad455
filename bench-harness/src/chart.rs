//! The SVG chart: throughput over time above, the latency percentile curve below.

use std::path::Path;

use plotters::prelude::*;

use crate::Report;

pub fn draw(report: &Report, path: &Path) -> Result<(), String> {
    let root = SVGBackend::new(path, (1000, 820)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, bottom) = root.split_vertically(400);
    let title = format!(
        "skein-bench {:?}: {:.0} records/s, {:.1} MiB/s ({} B records, fsync={})",
        report.mode,
        report.records_per_s,
        report.mib_per_s,
        report.parameters.message_size,
        report.broker.fsync
    );

    let seconds = report.timeline.last().map_or(1.0, |s| s.second).max(1.0);
    let peak = report.timeline.iter().map(|s| s.mib_per_s).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..seconds, 0.0..peak)
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc("seconds").y_desc("MiB/s").draw().map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(
            report.timeline.iter().map(|s| (s.second, s.mib_per_s)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| e.to_string())?;

    let curve = &report.latency_curve;
    let label = if report.e2e_latency_us.is_some() { "end-to-end latency" } else { "produce-ack latency" };
    if curve.is_empty() {
        root.present().map_err(|e| e.to_string())?;
        return Ok(());
    }
    // x: "nines" (0 = p0, 1 = p90, 2 = p99, …), y: µs on a log scale.
    let nines = |percentile: f64| -(1.0 - percentile / 100.0).max(1e-6).log10();
    let max_latency = curve.iter().map(|(_, v)| *v).max().unwrap_or(1).max(2) as f64 * 1.5;
    let mut chart = ChartBuilder::on(&bottom)
        .caption(format!("{label} by percentile"), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..5.0, (1.0..max_latency).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("µs")
        .x_label_formatter(&|x: &f64| match x.round() as i64 {
            0 => "p0".into(),
            1 => "p90".into(),
            2 => "p99".into(),
            3 => "p99.9".into(),
            4 => "p99.99".into(),
            _ => "p99.999".into(),
        })
        .x_labels(6)
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(
            curve.iter().map(|(p, v)| (nines(*p), (*v).max(1) as f64)),
            RED.stroke_width(2),
        ))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
