//! Line charts as SVG text, with no dependencies and no fonts to find: the
//! viewer renders the text. Axes get "nice" 1-2-5 ticks, labels and a legend
//! to the right of the plot area; the y axis may be log10; the x axis is
//! numeric or a list of categories (point x = category index).
//!
//! Used by [`crate::sweep`] for its reports.

use std::fmt::Write;

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    /// (x, y); non-finite points (and y <= 0 on a log axis) are skipped.
    pub points: Vec<(f64, f64)>,
    /// Draw a dot at every point (for sparse data).
    pub markers: bool,
    /// Join the points with a line (off for histograms with gaps).
    pub lines: bool,
}

impl Series {
    /// A line, with or without dots.
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>, markers: bool) -> Series {
        Series { name: name.into(), points, markers, lines: true }
    }

    /// Dots only.
    pub fn dots(name: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series { name: name.into(), points, markers: true, lines: false }
    }
}

#[derive(Debug, Clone)]
pub enum XAxis {
    Numeric,
    /// Category `i` sits at x = i.
    Categories(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    /// A smaller second line under the title.
    pub subtitle: String,
    pub x_label: String,
    pub y_label: String,
    pub x: XAxis,
    pub log_y: bool,
    /// Start the y axis at zero (linear axes only).
    pub y_from_zero: bool,
    pub series: Vec<Series>,
}

/// Matplotlib's "tab10": distinct, readable on white.
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf",
];

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 480.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = WIDTH - 200.0;
const TOP: f64 = 62.0;
const BOTTOM: f64 = HEIGHT - 58.0;

impl Chart {
    pub fn new(title: impl Into<String>, x_label: impl Into<String>, y_label: impl Into<String>) -> Chart {
        Chart {
            title: title.into(),
            subtitle: String::new(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            x: XAxis::Numeric,
            log_y: false,
            y_from_zero: false,
            series: Vec::new(),
        }
    }

    fn visible(&self, (x, y): (f64, f64)) -> bool {
        x.is_finite() && y.is_finite() && (!self.log_y || y > 0.0)
    }

    /// The chart as a standalone SVG document.
    pub fn to_svg(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="24" font-size="16" font-weight="bold" text-anchor="middle">{}</text>"#,
            (LEFT + RIGHT) / 2.0,
            esc(&self.title)
        );
        if !self.subtitle.is_empty() {
            let _ = writeln!(
                s,
                r##"<text x="{}" y="44" font-size="12" fill="#444" text-anchor="middle">{}</text>"##,
                (LEFT + RIGHT) / 2.0,
                esc(&self.subtitle)
            );
        }
        let points: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|se| se.points.iter().copied())
            .filter(|&p| self.visible(p))
            .collect();

        // X range and ticks.
        let (x_lo, x_hi, x_ticks): (f64, f64, Vec<(f64, String)>) = match &self.x {
            XAxis::Categories(cats) => {
                let n = cats.len().max(1) as f64;
                (-0.5, n - 0.5, cats.iter().enumerate().map(|(i, c)| (i as f64, c.clone())).collect())
            }
            XAxis::Numeric => {
                let lo = points.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
                let hi = points.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
                let (lo, hi) = if lo.is_finite() { (lo.min(0.0), hi) } else { (0.0, 1.0) };
                let (lo, hi, step) = nice_range(lo, hi, 8);
                (lo, hi, ticks(lo, hi, step).into_iter().map(|v| (v, fmt_tick(v, step))).collect())
            }
        };
        // Y range and ticks.
        let ys = points.iter().map(|p| p.1);
        let (y_lo, y_hi) = (ys.clone().fold(f64::INFINITY, f64::min), ys.fold(f64::NEG_INFINITY, f64::max));
        let (y_lo, y_hi, y_ticks): (f64, f64, Vec<(f64, String)>) = if self.log_y {
            let (lo, hi) =
                if y_lo.is_finite() { (y_lo.log10().floor(), y_hi.log10().ceil()) } else { (0.0, 1.0) };
            let hi = if hi <= lo { lo + 1.0 } else { hi };
            let every = ((hi - lo) / 8.0).ceil().max(1.0) as i32;
            let ticks = (lo as i32..=hi as i32)
                .filter(|e| (e - lo as i32) % every == 0)
                .map(|e| (f64::from(e), fmt_pow10(e)))
                .collect();
            (lo, hi, ticks)
        } else {
            let (lo, hi) = if y_lo.is_finite() { (y_lo, y_hi) } else { (0.0, 1.0) };
            let lo = if self.y_from_zero { lo.min(0.0) } else { lo };
            let (lo, hi, step) = nice_range(lo, hi, 6);
            (lo, hi, ticks(lo, hi, step).into_iter().map(|v| (v, fmt_tick(v, step))).collect())
        };
        let sx = |x: f64| LEFT + (x - x_lo) / (x_hi - x_lo) * (RIGHT - LEFT);
        let sy = |y: f64| {
            let y = if self.log_y { y.log10() } else { y };
            BOTTOM - (y - y_lo) / (y_hi - y_lo) * (BOTTOM - TOP)
        };

        // Grid, ticks and tick labels.
        for (v, label) in &y_ticks {
            let y = BOTTOM - (v - y_lo) / (y_hi - y_lo) * (BOTTOM - TOP);
            let _ =
                writeln!(s, r##"<line x1="{LEFT}" y1="{y:.1}" x2="{RIGHT}" y2="{y:.1}" stroke="#e4e4e4"/>"##);
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{:.1}" font-size="12" text-anchor="end">{}</text>"#,
                LEFT - 6.0,
                y + 4.0,
                esc(label)
            );
        }
        for (v, label) in &x_ticks {
            let x = sx(*v);
            let _ =
                writeln!(s, r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{BOTTOM}" stroke="#f0f0f0"/>"##);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{BOTTOM}" x2="{x:.1}" y2="{}" stroke="#333"/>"##,
                BOTTOM + 5.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{x:.1}" y="{}" font-size="12" text-anchor="middle">{}</text>"#,
                BOTTOM + 19.0,
                esc(label)
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
            RIGHT - LEFT,
            BOTTOM - TOP
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-size="13" text-anchor="middle">{}</text>"#,
            (LEFT + RIGHT) / 2.0,
            HEIGHT - 14.0,
            esc(&self.x_label)
        );
        let (yx, yy) = (18.0, (TOP + BOTTOM) / 2.0);
        let _ = writeln!(
            s,
            r#"<text x="{yx}" y="{yy}" font-size="13" text-anchor="middle" transform="rotate(-90 {yx} {yy})">{}</text>"#,
            esc(&self.y_label)
        );
        if points.is_empty() {
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" font-size="14" fill="#888" text-anchor="middle">no data</text>"##,
                (LEFT + RIGHT) / 2.0,
                (TOP + BOTTOM) / 2.0
            );
        }

        // Lines, clipped to the plot area.
        let _ = writeln!(
            s,
            r#"<clipPath id="plot"><rect x="{LEFT}" y="{TOP}" width="{}" height="{}"/></clipPath>"#,
            RIGHT - LEFT,
            BOTTOM - TOP
        );
        let _ =
            writeln!(s, r#"<g clip-path="url(#plot)" fill="none" stroke-width="2" stroke-linejoin="round">"#);
        for (i, se) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let dash = if i >= PALETTE.len() { r#" stroke-dasharray="6 3""# } else { "" };
            let pts: Vec<(f64, f64)> = se.points.iter().copied().filter(|&p| self.visible(p)).collect();
            if se.lines && pts.len() > 1 {
                let path: Vec<String> =
                    pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
                let _ = writeln!(s, r#"<polyline stroke="{color}"{dash} points="{}"/>"#, path.join(" "));
            }
            if se.markers || pts.len() == 1 {
                for &(x, y) in &pts {
                    let _ = writeln!(
                        s,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}" stroke="none"/>"#,
                        sx(x),
                        sy(y)
                    );
                }
            }
        }
        let _ = writeln!(s, "</g>");

        // Legend.
        for (i, se) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let dash = if i >= PALETTE.len() { r#" stroke-dasharray="6 3""# } else { "" };
            let y = TOP + 8.0 + 20.0 * i as f64;
            let x = RIGHT + 14.0;
            let _ = writeln!(
                s,
                r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="2.5"{dash}/>"#,
                x + 24.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" font-size="12">{}</text>"#,
                x + 30.0,
                y + 4.0,
                esc(&se.name)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// A range covering `[lo, hi]` whose ends are multiples of a 1-2-5 step
/// giving about `n` intervals; returns (lo, hi, step).
fn nice_range(lo: f64, hi: f64, n: usize) -> (f64, f64, f64) {
    let (lo, hi) = if hi - lo < 1e-12 * lo.abs().max(1.0) {
        (lo - 0.5 * lo.abs().max(1.0), hi + 0.5 * hi.abs().max(1.0))
    } else {
        (lo, hi)
    };
    let raw = (hi - lo) / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|&s| s >= raw).unwrap_or(10.0 * mag);
    ((lo / step).floor() * step, (hi / step).ceil() * step, step)
}

fn ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let n = ((hi - lo) / step).round() as i64;
    (0..=n).map(|i| lo + i as f64 * step).collect()
}

fn fmt_tick(v: f64, step: f64) -> String {
    let exp = step.log10().floor();
    // A step of 2.5 * 10^e needs one digit more than its exponent says.
    let quarter = (step / 10f64.powf(exp) - 2.5).abs() < 1e-9 && exp < 1.0;
    let decimals = (-exp).max(0.0) as usize + usize::from(quarter);
    let v = if v.abs() < step * 1e-9 { 0.0 } else { v };
    format!("{v:.decimals$}")
}

fn fmt_pow10(e: i32) -> String {
    match e {
        0 => "1".into(),
        1 => "10".into(),
        -1 => "0.1".into(),
        -2 => "0.01".into(),
        2 => "100".into(),
        3 => "1000".into(),
        _ => format!("1e{e}"),
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ranges_use_1_2_5_steps() {
        assert_eq!(nice_range(0.0, 9.3, 5), (0.0, 10.0, 2.0));
        assert_eq!(nice_range(0.12, 2.31, 6), (0.0, 2.5, 0.5));
        let (lo, hi, step) = nice_range(3.0, 3.0, 6);
        assert!(lo < 3.0 && hi > 3.0 && step > 0.0);
        assert_eq!(fmt_tick(0.25, 0.25), "0.25");
        assert_eq!(fmt_tick(10.0, 2.0), "10");
        assert_eq!(fmt_tick(0.4, 0.2), "0.4");
    }

    #[test]
    fn charts_are_well_formed_svg_with_a_legend() {
        let mut c = Chart::new("loss <&>", "wall time (s)", "loss");
        c.series.push(Series::line("BSP", vec![(0.0, 2.0), (1.0, 0.5), (2.0, f64::NAN)], false));
        c.series.push(Series::line("ASP", vec![(0.5, 1.0)], false));
        let svg = c.to_svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("loss &lt;&amp;&gt;") && svg.contains(">BSP<") && svg.contains(">ASP<"));
        assert_eq!(svg.matches("<polyline").count(), 1, "a one-point series is a dot");
        assert!(!svg.contains("NaN"));
        c.log_y = true;
        c.x = XAxis::Categories(vec!["BSP".into(), "ASP".into()]);
        assert!(!c.to_svg().contains("NaN"));
        assert!(Chart::new("empty", "x", "y").to_svg().contains("no data"));
    }
}
