//! The latency distribution as an SVG picture: latency against percentile
//! on the usual "nines" axis (50%, 90%, 99%, 99.9%, ...), one line per
//! series, drawn by hand (no plotting library in the build).

use std::fmt::Write as _;

use hdrhistogram::Histogram;

/// Points of a percentile curve: (nines, latency in ms), where nines is
/// `-log10(1 - quantile)` (0 = p0, 1 = p90, 2 = p99, 3 = p99.9).
pub fn percentile_curve(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    if histogram.is_empty() {
        return Vec::new();
    }
    let top = (histogram.len() as f64).log10().clamp(1.0, 6.0);
    let steps = (top * 40.0) as usize;
    let mut points: Vec<(f64, f64)> = (0..=steps)
        .map(|i| {
            let nines = top * i as f64 / steps as f64;
            let quantile = 1.0 - 10f64.powf(-nines);
            let ms = histogram.value_at_quantile(quantile) as f64 / 1e6;
            (nines, ms)
        })
        .collect();
    points.push((top, histogram.max() as f64 / 1e6));
    points
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 45.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// An SVG document plotting `series` (name, curve from
/// [`percentile_curve`]) under `title`.
pub fn latency_svg(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let max_x = series
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.0))
        .fold(1.0, f64::max)
        .ceil();
    let max_y = nice_ceiling(
        series
            .iter()
            .flat_map(|(_, c)| c.iter().map(|p| p.1))
            .fold(0.0, f64::max),
    );
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |nines: f64| LEFT + nines / max_x * plot_w;
    let y = |ms: f64| TOP + plot_h - ms / max_y * plot_h;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    for i in 0..=max_x as usize {
        let label = match i {
            0 => "0%".to_owned(),
            n => format!("{}%", 100.0 - 100.0 * 10f64.powi(-(n as i32))),
        };
        let px = x(i as f64);
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#ddd"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 18.0
        );
    }
    for i in 0..=5 {
        let ms = max_y * f64::from(i) / 5.0;
        let py = y(ms);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            py + 4.0,
            trim(ms)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text><text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">latency (ms)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 8.0,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    for (n, (name, curve)) in series.iter().enumerate() {
        let colour = COLOURS[n % COLOURS.len()];
        let points: Vec<String> = curve
            .iter()
            .map(|(nx, ms)| format!("{:.1},{:.1}", x(*nx), y(*ms)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let ly = TOP + 16.0 + 16.0 * n as f64;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{ly:.1}" fill="{colour}">{}</text>"#,
            LEFT + 10.0,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// 1, 2 or 5 times a power of ten, at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * power)
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::report::{latency_histogram, record_latency};
    use std::time::Duration;

    #[test]
    fn the_curve_rises_with_the_percentile_and_ends_at_the_max() {
        let mut h = latency_histogram();
        for us in 1..=10_000u64 {
            record_latency(&mut h, Duration::from_micros(us));
        }
        let curve = percentile_curve(&h);
        assert!(
            curve
                .windows(2)
                .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1)
        );
        let (nines, last) = *curve.last().unwrap();
        assert_eq!(nines, 4.0, "10,000 samples resolve four nines");
        assert!((last - 10.0).abs() < 0.01, "max is 10 ms: {last}");
        // p90 sits at one nine.
        let p90 = curve.iter().find(|p| (p.0 - 1.0).abs() < 1e-9).unwrap().1;
        assert!((p90 - 9.0).abs() < 0.01, "{p90}");
    }

    #[test]
    fn the_svg_has_axes_a_line_per_series_and_escaped_names() {
        let svg = latency_svg(
            "end-to-end <20 MB/s>",
            &[
                ("sluice".into(), vec![(0.0, 0.5), (1.0, 1.0), (2.0, 3.2)]),
                ("redis & co".into(), vec![(0.0, 0.7), (2.0, 4.0)]),
            ],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("99%") && svg.contains("90%"));
        assert!(svg.contains("&lt;20 MB/s&gt;") && svg.contains("redis &amp; co"));
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(4.0), 5.0);
        assert_eq!(nice_ceiling(0.013), 0.02);
    }
}
