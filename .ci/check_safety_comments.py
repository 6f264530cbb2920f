#!/usr/bin/env python3
"""Every `unsafe {` block and `unsafe impl` in src/ has a `// SAFETY:` comment on the lines just
above it (the statement it belongs to, or its comment block). Exits 1 naming the sites that lack one."""
import re,sys,os
bad=[]
for root,_,fs in os.walk('src'):
    for f in fs:
        if not f.endswith('.rs'): continue
        p=os.path.join(root,f); L=open(p).read().split('\n')
        for i,l in enumerate(L):
            s=l.strip()
            if s.startswith('//'): continue
            if re.search(r'\bunsafe\s*(\{|impl\b)', l):
                ok='SAFETY' in l
                j=i-1
                # walk up through comments and the statement this line continues
                while j>=0 and not ok:
                    t=L[j].strip()
                    if 'SAFETY' in t: ok=True; break
                    if t.startswith('//') or t.startswith('#['): j-=1; continue
                    if t=='' or t.endswith(';') or t.endswith('{') or t.endswith('}') or t.endswith('},'): break
                    j-=1
                if not ok: bad.append(f'{p}:{i+1}: {s}')
print('\n'.join(bad)); print(len(bad), 'unsafe sites without a SAFETY comment', file=sys.stderr); sys.exit(1 if bad else 0)
