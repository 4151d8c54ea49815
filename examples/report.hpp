// Reports for train_mnist: the per-epoch CSV log and an SVG chart of it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include <bnrelu/io/atomic_file.hpp>

struct EpochRecord {
  int epoch;
  double train_loss, train_acc, test_loss, test_acc, seconds;
};

inline std::string csv_log(const std::vector<EpochRecord>& rows) {
  std::ostringstream out;
  out << "epoch,train_loss,train_accuracy,test_loss,test_accuracy,seconds\n";
  char line[256];
  for (const auto& r : rows) {
    std::snprintf(line, sizeof line, "%d,%.6f,%.6f,%.6f,%.6f,%.3f\n", r.epoch, r.train_loss, r.train_acc,
                  r.test_loss, r.test_acc, r.seconds);
    out << line;
  }
  return out.str();
}

// Two panels (loss, accuracy), train and test per epoch, standalone SVG for any browser.
inline std::string svg_chart(const std::vector<EpochRecord>& rows, const std::string& title) {
  const double W = 1000, H = 400, panel_w = 400, panel_h = 270, top = 70, left0 = 80, gap = 100;
  std::ostringstream s;
  s << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << H
    << "' viewBox='0 0 " << W << ' ' << H << "' font-family='sans-serif' font-size='13'>\n"
    << "<rect width='100%' height='100%' fill='white'/>\n"
    << "<text x='" << W / 2 << "' y='28' text-anchor='middle' font-size='18' font-weight='bold'>" << title
    << "</text>\n";
  struct Series {
    const char* name;
    const char* color;
    double EpochRecord::*field;
  };
  auto panel = [&](double left, const char* label, Series a, Series b, bool percent) {
    double lo = 1e300, hi = -1e300;
    for (const auto& r : rows)
      for (auto f : {a.field, b.field}) {
        lo = std::min(lo, r.*f);
        hi = std::max(hi, r.*f);
      }
    if (rows.empty()) lo = 0, hi = 1;
    const double pad = (hi - lo) * 0.1 + 1e-9;
    lo -= pad;
    hi += pad;
    const int n = static_cast<int>(rows.size());
    const double e0 = n ? rows.front().epoch : 1, e1 = n ? rows.back().epoch : 1;
    auto X = [&](double e) { return left + (e1 > e0 ? (e - e0) / (e1 - e0) : 0.5) * panel_w; };
    auto Y = [&](double v) { return top + (1 - (v - lo) / (hi - lo)) * panel_h; };
    s << "<rect x='" << left << "' y='" << top << "' width='" << panel_w << "' height='" << panel_h
      << "' fill='none' stroke='#888'/>\n";
    s << "<text x='" << left + panel_w / 2 << "' y='" << top - 12 << "' text-anchor='middle' font-weight='bold'>"
      << label << "</text>\n";
    for (int t = 0; t <= 4; ++t) {  // horizontal grid with values
      const double v = lo + (hi - lo) * t / 4.0;
      char buf[32];
      std::snprintf(buf, sizeof buf, percent ? "%.1f%%" : "%.3f", percent ? 100 * v : v);
      s << "<line x1='" << left << "' x2='" << left + panel_w << "' y1='" << Y(v) << "' y2='" << Y(v)
        << "' stroke='#eee'/>\n<text x='" << left - 6 << "' y='" << Y(v) + 4 << "' text-anchor='end' fill='#555'>"
        << buf << "</text>\n";
    }
    for (const auto& r : rows)
      s << "<text x='" << X(r.epoch) << "' y='" << top + panel_h + 18 << "' text-anchor='middle' fill='#555'>"
        << r.epoch << "</text>\n";
    s << "<text x='" << left + panel_w / 2 << "' y='" << top + panel_h + 38 << "' text-anchor='middle'>epoch</text>\n";
    int k = 0;
    for (const auto& ser : {a, b}) {
      s << "<polyline fill='none' stroke='" << ser.color << "' stroke-width='2.5' points='";
      for (const auto& r : rows) s << X(r.epoch) << ',' << Y(r.*ser.field) << ' ';
      s << "'/>\n";
      for (const auto& r : rows)
        s << "<circle cx='" << X(r.epoch) << "' cy='" << Y(r.*ser.field) << "' r='4' fill='" << ser.color << "'/>\n";
      const double ly = top + panel_h + 58;
      s << "<rect x='" << left + 120 + 120 * k << "' y='" << ly - 10 << "' width='14' height='4' fill='" << ser.color
        << "'/><text x='" << left + 140 + 120 * k << "' y='" << ly - 4 << "'>" << ser.name << "</text>\n";
      ++k;
    }
  };
  panel(left0, "cross-entropy loss", {"train", "#1f77b4", &EpochRecord::train_loss},
        {"test", "#d62728", &EpochRecord::test_loss}, false);
  panel(left0 + panel_w + gap, "accuracy", {"train", "#1f77b4", &EpochRecord::train_acc},
        {"test", "#d62728", &EpochRecord::test_acc}, true);
  s << "</svg>\n";
  return s.str();
}

// The chart's path for a CSV log: the same name with .svg for its extension.
inline std::string svg_path(const std::string& csv_path) {
  std::string svg = csv_path;
  const auto dot = svg.find_last_of('.');
  const auto slash = svg.find_last_of('/');
  if (dot != std::string::npos && (slash == std::string::npos || dot > slash)) svg.resize(dot);
  return svg + ".svg";
}

// Writes the CSV at path and the chart next to it (svg_path), each atomically.
inline std::string write_reports(const std::string& csv_path, const std::vector<EpochRecord>& rows,
                                 const std::string& title) {
  bnrelu::io::write_file_atomic(csv_path, csv_log(rows));
  const std::string svg = svg_path(csv_path);
  bnrelu::io::write_file_atomic(svg, svg_chart(rows, title));
  return svg;
}
